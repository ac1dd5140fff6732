package pgsource

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/bulkfhir/bulkexport"
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
