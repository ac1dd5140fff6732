package pgsource

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"net/url"
	"os"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/bulkfhir/bulkexport"
	"github.com/bulkfhir/bulkexport/bulkexporttest"
	"github.com/bulkfhir/bulkexport/examples/internal/dataset"
	"github.com/bulkfhir/bulkexport/fhirbulk"
	"github.com/bulkfhir/bulkexport/sourcetest"
	"github.com/jackc/pgx/v5/pgxpool"
)

// testPool connects to BULKEXPORT_TEST_POSTGRES_URL and returns a table
// name of its own, dropped at the end of the test.
func testPool(t testing.TB) (*pgxpool.Pool, string) {
	t.Helper()
	url := os.Getenv("BULKEXPORT_TEST_POSTGRES_URL")
	if url == "" {
		t.Skip("BULKEXPORT_TEST_POSTGRES_URL is not set")
	}
	ctx := context.Background()
	pool, err := pgxpool.New(ctx, url)
	if err != nil {
		t.Fatal(err)
	}
	var b [6]byte
	_, _ = rand.Read(b[:])
	table := "pgsource_" + hex.EncodeToString(b[:])
	t.Cleanup(func() {
		_, err := pool.Exec(context.Background(), fmt.Sprintf("DROP TABLE IF EXISTS %s_members, %s_groups, %s", table, table, table))
		if err != nil {
			t.Errorf("drop %s: %v", table, err)
		}
		pool.Close()
	})
	return pool, table
}

// collect is a ResourceWriter that keeps what it is given.
type collect struct {
	ids         []string
	issues      []fhirbulk.Issue
	checkpoints []checkpoint
	failAfter   int // Write fails once this many were written (0: never)
}

type checkpoint struct {
	cursor  string
	written int
}

var errStop = errors.New("stop")

func (c *collect) Write(b []byte) error {
	if c.failAfter > 0 && len(c.ids) == c.failAfter {
		return errStop
	}
	var v struct {
		ResourceType, ID string
	}
	if err := json.Unmarshal(b, &v); err != nil {
		return err
	}
	c.ids = append(c.ids, v.ResourceType+"/"+v.ID)
	return nil
}
func (c *collect) Deleted(string, time.Time) error { return nil }
func (c *collect) Issue(i fhirbulk.Issue) error    { c.issues = append(c.issues, i); return nil }
func (c *collect) Checkpoint(cur string) error {
	c.checkpoints = append(c.checkpoints, checkpoint{cur, len(c.ids)})
	return nil
}

func loadDataset(t testing.TB, d *dataset.Dataset, pageSize int) (*Source, *pgxpool.Pool, string) {
	t.Helper()
	pool, table := testPool(t)
	if err := Load(context.Background(), pool, d, table); err != nil {
		t.Fatal(err)
	}
	src, err := New(pool, Options{Table: table, PageSize: pageSize})
	if err != nil {
		t.Fatal(err)
	}
	return src, pool, table
}

// TestMatchesDataset exports every type at every level, with and without
// _since, _until and patient, through the in-memory dataset and through
// the PostgreSQL Source over the same data, and compares the ids.
func TestMatchesDataset(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	d := dataset.New(45)
	src, _, _ := loadDataset(t, d, 7)

	since := dataset.Reference.AddDate(0, -8, 0)
	until := dataset.Reference.AddDate(0, -2, 0)
	queries := []struct {
		name string
		q    bulkexport.Query
	}{
		{"system", bulkexport.Query{Level: fhirbulk.LevelSystem}},
		{"system since", bulkexport.Query{Level: fhirbulk.LevelSystem, Since: since}},
		{"system window", bulkexport.Query{Level: fhirbulk.LevelSystem, Since: since, Until: until}},
		{"system tx", bulkexport.Query{Level: fhirbulk.LevelSystem, TransactionTime: until}},
		{"patient", bulkexport.Query{Level: fhirbulk.LevelPatient}},
		{"patient since", bulkexport.Query{Level: fhirbulk.LevelPatient, Since: since}},
		{"patient=", bulkexport.Query{Level: fhirbulk.LevelPatient, Patients: []string{"p-7", "p-3", "p-99", "x"}}},
		{"group all", bulkexport.Query{Level: fhirbulk.LevelGroup, GroupID: "all"}},
		{"group even", bulkexport.Query{Level: fhirbulk.LevelGroup, GroupID: "even"}},
		{"group cohort-3 until", bulkexport.Query{Level: fhirbulk.LevelGroup, GroupID: "cohort-3", Until: until}},
		{"group odd patient=", bulkexport.Query{Level: fhirbulk.LevelGroup, GroupID: "odd", Patients: []string{"p-1", "p-2", "p-9"}, Since: since}},
		{"elements", bulkexport.Query{Level: fhirbulk.LevelSystem, Elements: []string{"subject"}}},
	}
	for _, tc := range queries {
		types, err := d.ResourceTypes(ctx, tc.q.Level)
		if err != nil {
			t.Fatal(err)
		}
		got, err := src.ResourceTypes(ctx, tc.q.Level)
		if err != nil {
			t.Fatal(err)
		}
		if !slices.Equal(got, types) {
			t.Errorf("%s: ResourceTypes = %v, dataset %v", tc.name, got, types)
		}
		for _, typ := range types {
			var want, have collect
			if err := d.Export(ctx, &tc.q, typ, &want); err != nil {
				t.Fatal(err)
			}
			if err := src.Export(ctx, &tc.q, typ, &have); err != nil {
				t.Fatalf("%s %s: %v", tc.name, typ, err)
			}
			w, h := slices.Sorted(slices.Values(want.ids)), slices.Sorted(slices.Values(have.ids))
			if !slices.Equal(w, h) {
				t.Errorf("%s %s: got %d ids, dataset %d\ngot  %v\nwant %v", tc.name, typ, len(h), len(w), h, w)
			}
			if len(want.ids) == 0 && tc.name == "system" {
				t.Errorf("%s %s: empty", tc.name, typ)
			}
			if len(want.issues) != len(have.issues) {
				t.Errorf("%s %s: %d issues, dataset %d: %v", tc.name, typ, len(have.issues), len(want.issues), have.issues)
			}
			n, err := src.Count(ctx, &tc.q, typ)
			if err != nil || n != int64(len(w)) {
				t.Errorf("%s %s: Count = %d, %v; want %d", tc.name, typ, n, err, len(w))
			}
		}
	}
}

// TestElements checks that _elements keeps the listed and mandatory
// elements and tags the result SUBSETTED, as the dataset does.
func TestElements(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	d := dataset.New(3)
	src, _, _ := loadDataset(t, d, 0)
	q := &bulkexport.Query{Level: fhirbulk.LevelSystem, Elements: []string{"value[x]"}}
	var keys func(b []byte) []string = func(b []byte) []string {
		var m map[string]json.RawMessage
		if err := json.Unmarshal(b, &m); err != nil {
			t.Fatal(err)
		}
		var out []string
		for k := range m {
			out = append(out, k)
		}
		slices.Sort(out)
		return out
	}
	var want, have raw
	if err := d.Export(ctx, q, "Observation", &want); err != nil {
		t.Fatal(err)
	}
	if err := src.Export(ctx, q, "Observation", &have); err != nil {
		t.Fatal(err)
	}
	if len(want) == 0 || len(want) != len(have) {
		t.Fatalf("got %d resources, dataset %d", len(have), len(want))
	}
	for _, w := range want {
		var id struct{ ID string }
		_ = json.Unmarshal(w, &id)
		found := false
		for _, h := range have {
			var hid struct{ ID string }
			_ = json.Unmarshal(h, &hid)
			if hid.ID != id.ID {
				continue
			}
			found = true
			if !slices.Equal(keys(w), keys(h)) {
				t.Errorf("%s: elements %v, dataset %v", id.ID, keys(h), keys(w))
			}
			if !strings.Contains(string(h), `"SUBSETTED"`) {
				t.Errorf("%s: no SUBSETTED tag: %s", id.ID, h)
			}
		}
		if !found {
			t.Errorf("%s missing", id.ID)
		}
	}
}

type raw [][]byte

func (r *raw) Write(b []byte) error            { *r = append(*r, append([]byte(nil), b...)); return nil }
func (r *raw) Deleted(string, time.Time) error { return nil }
func (r *raw) Issue(fhirbulk.Issue) error      { return nil }
func (r *raw) Checkpoint(string) error         { return nil }

// TestResume interrupts an export in the middle of a page, resumes it
// from the last checkpoint, and checks that every resource is written
// exactly once; and resumes from every checkpoint of a full export.
func TestResume(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	d := dataset.New(30)
	src, _, _ := loadDataset(t, d, 8)
	q := bulkexport.Query{Level: fhirbulk.LevelGroup, GroupID: "odd"}

	var full collect
	if err := src.Export(ctx, &q, "Observation", &full); err != nil {
		t.Fatal(err)
	}
	if len(full.checkpoints) < 3 {
		t.Fatalf("only %d checkpoints over %d resources", len(full.checkpoints), len(full.ids))
	}
	for _, cp := range full.checkpoints {
		rq := q
		rq.Cursor = cp.cursor
		var rest collect
		if err := src.Export(ctx, &rq, "Observation", &rest); err != nil {
			t.Fatal(err)
		}
		if !slices.Equal(rest.ids, full.ids[cp.written:]) {
			t.Errorf("resumed after %s: %v, want %v", cp.cursor, rest.ids, full.ids[cp.written:])
		}
	}

	// Crash in the middle of the third page.
	crashed := collect{failAfter: 2*8 + 3}
	if err := src.Export(ctx, &q, "Observation", &crashed); !errors.Is(err, errStop) {
		t.Fatalf("interrupted export: %v, want errStop", err)
	}
	last := crashed.checkpoints[len(crashed.checkpoints)-1]
	if last.written != 16 {
		t.Fatalf("last checkpoint after %d resources, want 16", last.written)
	}
	rq := q
	rq.Cursor = last.cursor
	var resumed collect
	if err := src.Export(ctx, &rq, "Observation", &resumed); err != nil {
		t.Fatal(err)
	}
	all := append(crashed.ids[:last.written:last.written], resumed.ids...)
	if !slices.Equal(all, full.ids) {
		t.Errorf("crashed+resumed = %d resources, want %d", len(all), len(full.ids))
	}

	rq.Cursor = "nope"
	if err := src.Export(ctx, &rq, "Observation", &collect{}); err == nil {
		t.Error("invalid cursor accepted")
	}
}

// TestOptional checks CheckGroup, the _typeFilter rejection and that Load
// is idempotent.
func TestOptional(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	d := dataset.New(5)
	src, pool, table := loadDataset(t, d, 0)
	if err := src.CheckGroup(ctx, "cohort-9"); err != nil { // no members, still known
		t.Errorf("CheckGroup(cohort-9) = %v", err)
	}
	if err := src.CheckGroup(ctx, "nope"); !errors.Is(err, bulkexport.ErrNotFound) {
		t.Errorf("CheckGroup(nope) = %v, want ErrNotFound", err)
	}
	if err := src.CheckTypeFilter("Observation", map[string][]string{"code": {"x"}}); err == nil {
		t.Error("CheckTypeFilter accepted a filter")
	}
	q := &bulkexport.Query{Level: fhirbulk.LevelSystem, TypeFilters: []bulkexport.TypeFilter{{Type: "Observation", Query: "code=x"}}}
	var be *bulkexport.Error
	if err := src.Export(ctx, q, "Observation", &collect{}); !errors.As(err, &be) || be.Status != 400 {
		t.Errorf("Export with _typeFilter = %v, want a 400 *bulkexport.Error", err)
	}
	count := func() int {
		var n int
		if err := pool.QueryRow(ctx, "SELECT count(*) FROM "+table).Scan(&n); err != nil {
			t.Fatal(err)
		}
		return n
	}
	before := count()
	if err := Load(ctx, pool, d, table); err != nil {
		t.Fatal(err)
	}
	if after := count(); after != before || before == 0 {
		t.Errorf("after a second Load: %d rows, before %d", after, before)
	}
	if _, err := New(pool, Options{Table: "Bad; DROP"}); err == nil {
		t.Error("New accepted a bad table name")
	}
}

// TestConformance runs the Source conformance suite twice: over the
// suite's own Dataset loaded with LoadResources, and over the example
// dataset loaded with Load.
func TestConformance(t *testing.T) {
	t.Parallel()
	t.Run("suite", func(t *testing.T) {
		pool, table := testPool(t)
		sourcetest.Run(t, func(t *testing.T, data sourcetest.Dataset) bulkexport.Source {
			if err := LoadResources(context.Background(), pool, table, data.Resources, data.Groups); err != nil {
				t.Fatal(err)
			}
			src, err := New(pool, Options{Table: table, PageSize: 4})
			if err != nil {
				t.Fatal(err)
			}
			return src
		})
	})
	t.Run("dataset", func(t *testing.T) {
		ctx := context.Background()
		d := dataset.New(12)
		src, _, _ := loadDataset(t, d, 5)
		var data sourcetest.Dataset
		types, _ := d.ResourceTypes(ctx, fhirbulk.LevelSystem)
		for _, typ := range types {
			var r raw
			if err := d.Export(ctx, &bulkexport.Query{Level: fhirbulk.LevelSystem}, typ, &r); err != nil {
				t.Fatal(err)
			}
			for _, b := range r {
				data.Resources = append(data.Resources, b)
			}
		}
		data.Groups = map[string][]string{}
		for _, g := range []string{"even", "odd"} {
			members, _ := d.GroupMembers(g)
			for _, n := range members {
				data.Groups[g] = append(data.Groups[g], fmt.Sprintf("p-%d", n))
			}
		}
		sourcetest.RunFixed(t, src, data)
	})
}

// TestRanges checks the range logic without a database: the ranges made
// from any bounds cover every key exactly once, open at both ends, and
// their tokens read back as the same ranges.
func TestRanges(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name   string
		bounds []int64
		want   []string
	}{
		{"none", nil, nil},
		{"one", []int64{5}, []string{"(,5]", "(5,]"}},
		{"sorted", []int64{3, 7, 9}, []string{"(,3]", "(3,7]", "(7,9]", "(9,]"}},
		{"unsorted and repeated", []int64{9, 3, 3, 7, 9}, []string{"(,3]", "(3,7]", "(7,9]", "(9,]"}},
		{"negative and zero", []int64{0, -4}, []string{"(,-4]", "(-4,0]", "(0,]"}},
		{"unusable max", []int64{math.MaxInt64}, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ranges := splitRanges(tc.bounds)
			var tokens []string
			for _, r := range ranges {
				tok := r.String()
				tokens = append(tokens, tok)
				back, err := parseRange(tok)
				if err != nil || back != r {
					t.Errorf("parseRange(%q) = %v, %v; want %v", tok, back, err, r)
				}
			}
			if !slices.Equal(tokens, tc.want) {
				t.Fatalf("tokens %v, want %v", tokens, tc.want)
			}
			if len(ranges) == 0 {
				return
			}
			keys := []int64{math.MinInt64 + 1, -100, math.MaxInt64, math.MaxInt64 - 1}
			for k := int64(-10); k <= 20; k++ {
				keys = append(keys, k)
			}
			for _, b := range tc.bounds {
				keys = append(keys, b-1, b, b+1)
			}
			for _, k := range keys {
				in := 0
				for _, r := range ranges {
					if r.contains(k) {
						in++
					}
				}
				if in != 1 {
					t.Errorf("key %d is in %d ranges of %v", k, in, tokens)
				}
			}
		})
	}
	for _, tok := range []string{"x", "(1,2)", "[1,2]", "(2,1]", "(3,3]", "(a,]", "(,b]", "(1;2]", "(1,2,3]", "(,9223372036854775807]", "(-9223372036854775808,]"} {
		if r, err := parseRange(tok); err == nil {
			t.Errorf("parseRange(%q) = %v, want an error", tok, r)
		}
	}
	if r, err := parseRange(""); err != nil || r != wholeRange {
		t.Errorf(`parseRange("") = %v, %v`, r, err)
	}
}

// TestPartsFor checks how many parts a count makes and where their
// bounds are picked on the grid of quantiles.
func TestPartsFor(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		rows           int64
		page, max, out int
	}{
		{0, 10, 8, 1}, {19, 10, 8, 1}, {20, 10, 8, 2}, {35, 10, 8, 3},
		{80, 10, 8, 8}, {10000, 10, 8, 8}, {10000, 10, 1, 1}, {10000, 10, 0, 1},
	} {
		if got := partsFor(tc.rows, tc.page, tc.max); got != tc.out {
			t.Errorf("partsFor(%d, %d, %d) = %d, want %d", tc.rows, tc.page, tc.max, got, tc.out)
		}
	}
	// A grid of 31 quantiles (8 per part, max 4) of keys 10, 20, … 310.
	grid := make([]int64, 31)
	for i := range grid {
		grid[i] = int64(i+1) * 10
	}
	for _, tc := range []struct {
		parts int
		want  []int64
	}{
		{1, nil},
		{2, []int64{160}},
		{3, []int64{110, 210}}, // 32/3 = 10.7 → 11th, 21.3 → 21st
		{4, []int64{80, 160, 240}},
	} {
		if got := pickBounds(grid, tc.parts); !slices.Equal(got, tc.want) {
			t.Errorf("pickBounds(%d) = %v, want %v", tc.parts, got, tc.want)
		}
	}
}

// exportParts exports typ part by part and returns every id written, in
// part order, with the issues.
func exportParts(t *testing.T, src *Source, q bulkexport.Query, typ string, tokens []string) ([]string, []fhirbulk.Issue, [][]string) {
	t.Helper()
	var all []string
	var issues []fhirbulk.Issue
	var parts [][]string
	for _, tok := range tokens {
		pq := q
		pq.Partition = tok
		var c collect
		if err := src.Export(context.Background(), &pq, typ, &c); err != nil {
			t.Fatalf("%s part %s: %v", typ, tok, err)
		}
		all = append(all, c.ids...)
		issues = append(issues, c.issues...)
		parts = append(parts, c.ids)
		n, err := src.Count(context.Background(), &pq, typ)
		if err != nil || n != int64(len(c.ids)) {
			t.Errorf("%s part %s: Count = %d, %v; Export wrote %d", typ, tok, n, err, len(c.ids))
		}
	}
	return all, issues, parts
}

// TestPartitions splits every type at every level (with _since, the
// patient parameter) and exports the parts one by one: together they
// write exactly what the whole type does, each resource once, and the
// warnings about unknown patients once.
func TestPartitions(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	d := dataset.New(45)
	const page = 7
	src, pool, table := loadDataset(t, d, page)
	since := dataset.Reference.AddDate(0, -8, 0)
	split := 0
	for _, tc := range []struct {
		name string
		q    bulkexport.Query
	}{
		{"system", bulkexport.Query{Level: fhirbulk.LevelSystem}},
		{"system since", bulkexport.Query{Level: fhirbulk.LevelSystem, Since: since}},
		{"patient", bulkexport.Query{Level: fhirbulk.LevelPatient}},
		{"patient=", bulkexport.Query{Level: fhirbulk.LevelPatient, Patients: []string{"p-7", "p-3", "p-99", "x", "p-20", "p-31"}}},
		{"group even since", bulkexport.Query{Level: fhirbulk.LevelGroup, GroupID: "even", Since: since}},
		{"group odd patient=", bulkexport.Query{Level: fhirbulk.LevelGroup, GroupID: "odd", Patients: []string{"p-1", "p-2", "p-9", "p-11"}}},
	} {
		types, err := src.ResourceTypes(ctx, tc.q.Level)
		if err != nil {
			t.Fatal(err)
		}
		for _, typ := range types {
			var whole collect
			if err := src.Export(ctx, &tc.q, typ, &whole); err != nil {
				t.Fatal(err)
			}
			for _, max := range []int{1, 2, 3, 8} {
				tokens, err := src.Partitions(ctx, &tc.q, typ, max)
				if err != nil {
					t.Fatalf("%s %s: Partitions: %v", tc.name, typ, err)
				}
				if len(tokens) > max {
					t.Errorf("%s %s: %d parts, max %d", tc.name, typ, len(tokens), max)
				}
				switch {
				case max > 1 && len(whole.ids) >= 2*page && len(tokens) < 2:
					t.Errorf("%s %s: %d resources not split in %d: %v", tc.name, typ, len(whole.ids), max, tokens)
				case len(whole.ids) < 2*page && len(tokens) > 0:
					t.Errorf("%s %s: %d resources split: %v", tc.name, typ, len(whole.ids), tokens)
				}
				if len(tokens) == 0 {
					continue
				}
				split++
				got, issues, parts := exportParts(t, src, tc.q, typ, tokens)
				if w, g := slices.Sorted(slices.Values(whole.ids)), slices.Sorted(slices.Values(got)); !slices.Equal(w, g) {
					t.Errorf("%s %s in %v: parts wrote %d ids, the whole %d\nparts %v\nwhole %v", tc.name, typ, tokens, len(g), len(w), g, w)
				}
				if !slices.Equal(got, whole.ids) {
					t.Errorf("%s %s: the parts in order are not the whole type's order", tc.name, typ)
				}
				if len(issues) != len(whole.issues) {
					t.Errorf("%s %s: parts wrote %d issues, the whole %d", tc.name, typ, len(issues), len(whole.issues))
				}
				// About equal parts: none more than a page larger than
				// another (percentile_disc over the selected keys).
				sizes := []int{}
				for _, p := range parts {
					sizes = append(sizes, len(p))
				}
				if slices.Max(sizes)-slices.Min(sizes) > page || slices.Min(sizes) == 0 {
					t.Errorf("%s %s: uneven parts %v", tc.name, typ, sizes)
				}
			}
		}
	}
	if split < 10 {
		t.Errorf("only %d splits: the dataset is too small to test partitioning", split)
	}

	// Rows added after the split still belong to exactly one part (the
	// last, open above; a row below the first bound would go to the
	// first): the parts' counts add up to the whole type's.
	q := bulkexport.Query{Level: fhirbulk.LevelSystem}
	tokens, err := src.Partitions(ctx, &q, "Observation", 4)
	if err != nil || len(tokens) != 4 {
		t.Fatalf("Partitions = %v, %v", tokens, err)
	}
	if _, err := pool.Exec(ctx, `INSERT INTO `+table+` (type, id, patient, last_updated, body)
		SELECT type, id || '-copy', patient, last_updated, body FROM `+table+` WHERE type = 'Observation'`); err != nil {
		t.Fatal(err)
	}
	total, err := src.Count(ctx, &q, "Observation")
	if err != nil {
		t.Fatal(err)
	}
	var sum int64
	for _, tok := range tokens {
		pq := q
		pq.Partition = tok
		n, err := src.Count(ctx, &pq, "Observation")
		if err != nil {
			t.Fatal(err)
		}
		sum += n
	}
	if sum != total {
		t.Errorf("after adding rows, the parts count %d, the type %d", sum, total)
	}

	pq := q
	pq.Partition = "(5,3]"
	if err := src.Export(ctx, &pq, "Observation", &collect{}); err == nil {
		t.Error("a bad partition token was accepted")
	}
}

// TestPartitionResume resumes one part of a type from each of its
// checkpoints, and from a cursor before its range: it writes the rest of
// that part and nothing of the others.
func TestPartitionResume(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	d := dataset.New(30)
	src, _, _ := loadDataset(t, d, 5)
	q := bulkexport.Query{Level: fhirbulk.LevelSystem}
	tokens, err := src.Partitions(ctx, &q, "Observation", 3)
	if err != nil || len(tokens) != 3 {
		t.Fatalf("Partitions = %v, %v", tokens, err)
	}
	pq := q
	pq.Partition = tokens[1] // bounded at both ends
	var part collect
	if err := src.Export(ctx, &pq, "Observation", &part); err != nil {
		t.Fatal(err)
	}
	if len(part.checkpoints) < 3 {
		t.Fatalf("only %d checkpoints in %s", len(part.checkpoints), tokens[1])
	}
	r, _ := parseRange(tokens[1])
	for _, cp := range part.checkpoints {
		seq, _ := strconv.ParseInt(cp.cursor, 10, 64)
		if !r.contains(seq) {
			t.Errorf("checkpoint %s outside %s", cp.cursor, tokens[1])
		}
		rq := pq
		rq.Cursor = cp.cursor
		var rest collect
		if err := src.Export(ctx, &rq, "Observation", &rest); err != nil {
			t.Fatal(err)
		}
		if !slices.Equal(rest.ids, part.ids[cp.written:]) {
			t.Errorf("%s resumed after %s: %v, want %v", tokens[1], cp.cursor, rest.ids, part.ids[cp.written:])
		}
	}
	// A cursor before the range (seq 1) still starts at the range.
	rq := pq
	rq.Cursor = "1"
	var rest collect
	if err := src.Export(ctx, &rq, "Observation", &rest); err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(rest.ids, part.ids) {
		t.Errorf("%s from cursor 1: %d ids, want the part's %d", tokens[1], len(rest.ids), len(part.ids))
	}
}

// TestPartitionedWorker exports through the real handler and Worker with a
// MemoryStore (a UnitStore) and a DirStorage, partitioned (4 parts, 3 at
// once) and not: the same resources, each exactly once, at every level
// and with _since; the partitioned manifest lists several files for the
// types that were split.
func TestPartitionedWorker(t *testing.T) {
	t.Parallel()
	d := dataset.New(40)
	src, _, _ := loadDataset(t, d, 10)
	server := func(parts int) *bulkexporttest.Server {
		return bulkexporttest.NewServer(t, &bulkexporttest.ServerOptions{Source: src,
			Worker: bulkexport.WorkerOptions{Partitions: parts, UnitConcurrency: 3}})
	}
	whole, split := server(1), server(4)
	since := url.QueryEscape(fhirbulk.FormatInstant(dataset.Reference.AddDate(0, -8, 0)))
	for _, path := range []string{"/$export", "/Patient/$export", "/Group/even/$export", "/$export?_since=" + since, "/Group/odd/$export?_since=" + since} {
		want := whole.Export(t, path)
		got := split.Export(t, path)
		files := func(r *bulkexporttest.Result) map[string]int {
			n := map[string]int{}
			for _, f := range r.Manifest.Output {
				n[f.Type]++
			}
			return n
		}
		if len(want.Output) == 0 {
			t.Fatalf("%s: nothing exported", path)
		}
		more := false
		for typ := range want.Output {
			w, g := slices.Sorted(slices.Values(want.IDs(typ))), slices.Sorted(slices.Values(got.IDs(typ)))
			if !slices.Equal(w, g) {
				t.Errorf("%s %s: partitioned %d ids, whole %d", path, typ, len(g), len(w))
			}
			if len(slices.Compact(g)) != len(got.IDs(typ)) {
				t.Errorf("%s %s: an id written twice", path, typ)
			}
			if files(got)[typ] > files(want)[typ] {
				more = true
			}
		}
		if len(got.Output) != len(want.Output) {
			t.Errorf("%s: partitioned types %d, whole %d", path, len(got.Output), len(want.Output))
		}
		if !more {
			t.Errorf("%s: the partitioned export has no more files than the whole: was it split? %v", path, files(got))
		}
	}
}

// TestEstimateCounts: with Options.EstimateCounts, Count answers the
// planner's estimate: positive, and near the exact count once the table
// is analysed (Load analyses it).
func TestEstimateCounts(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	exact, pool, table := loadDataset(t, dataset.New(300), 50)
	est, err := New(pool, Options{Table: table, PageSize: 50, EstimateCounts: true})
	if err != nil {
		t.Fatal(err)
	}
	q := &bulkexport.Query{Level: fhirbulk.LevelSystem}
	for _, typ := range []string{"Patient", "Observation", "Condition"} {
		want, err := exact.Count(ctx, q, typ)
		if err != nil {
			t.Fatal(err)
		}
		got, err := est.Count(ctx, q, typ)
		if err != nil {
			t.Fatal(err)
		}
		if got <= 0 || got < want/2 || got > want*2 {
			t.Errorf("%s: estimate %d, exact %d", typ, got, want)
		}
	}
}
