package pgsource

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/bulkfhir/bulkexport"
	"github.com/bulkfhir/bulkexport/examples/internal/dataset"
	"github.com/bulkfhir/bulkexport/fhirbulk"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// schema returns the statements that create the tables of table and their
// indexes, if they do not exist.
func schema(t tables, table string) []string {
	base := table[strings.LastIndex(table, ".")+1:]
	idx := func(suffix string) string { return pgx.Identifier{base + suffix}.Sanitize() }
	return []string{
		`CREATE TABLE IF NOT EXISTS ` + t.resources + ` (
			seq          bigint GENERATED ALWAYS AS IDENTITY,
			type         text NOT NULL,
			id           text NOT NULL,
			patient      text,
			last_updated timestamptz NOT NULL,
			body         bytea NOT NULL,
			PRIMARY KEY (type, id))`,
		// The keyset: one index range scan per type, in seq order.
		`CREATE UNIQUE INDEX IF NOT EXISTS ` + idx("_type_seq") + ` ON ` + t.resources + ` (type, seq)`,
		// Patient compartment lookups (the patient parameter, Group members).
		`CREATE INDEX IF NOT EXISTS ` + idx("_patient") + ` ON ` + t.resources + ` (patient, type, seq) WHERE patient IS NOT NULL`,
		`CREATE TABLE IF NOT EXISTS ` + t.groups + ` (
			id   text PRIMARY KEY,
			name text NOT NULL DEFAULT '')`,
		`CREATE TABLE IF NOT EXISTS ` + t.members + ` (
			group_id text NOT NULL REFERENCES ` + t.groups + ` (id),
			patient  text NOT NULL,
			PRIMARY KEY (group_id, patient))`,
	}
}

// row is one resource as the table holds it.
type row struct {
	typ, id, patient string // patient "" is NULL
	lastUpdated      time.Time
	body             []byte
}

// Load creates table (and its _groups and _members tables) with their
// indexes if they do not exist, and replaces their content with the
// dataset's resources and Groups, through COPY, in one transaction. Loading
// the same dataset again gives the same content (seq restarts at 1).
func Load(ctx context.Context, pool *pgxpool.Pool, d *dataset.Dataset, table string) error {
	types, err := d.ResourceTypes(ctx, fhirbulk.LevelSystem)
	if err != nil {
		return err
	}
	groups := map[string][]string{}
	names := map[string]string{}
	for _, g := range dataset.Groups() {
		members, err := d.GroupMembers(g)
		if err != nil {
			return err
		}
		groups[g] = []string{}
		for _, n := range members {
			groups[g] = append(groups[g], "p-"+strconv.Itoa(n))
		}
		names[g] = dataset.GroupName(g)
	}
	produce := func(ctx context.Context, out chan<- row) error {
		for _, typ := range types {
			q := &bulkexport.Query{Level: fhirbulk.LevelSystem}
			if err := d.Export(ctx, q, typ, &rowWriter{ctx: ctx, typ: typ, out: out}); err != nil {
				return err
			}
		}
		return nil
	}
	return load(ctx, pool, table, produce, groups, names)
}

// LoadResources is Load for any resources, such as a sourcetest.Dataset's:
// each is JSON with resourceType, id and meta.lastUpdated; its Patient
// compartment owner is itself for a Patient, else the Patient its subject
// or patient element references. groups maps Group ids to their members'
// patient ids.
func LoadResources(ctx context.Context, pool *pgxpool.Pool, table string, resources []json.RawMessage, groups map[string][]string) error {
	produce := func(ctx context.Context, out chan<- row) error {
		for _, raw := range resources {
			var head struct {
				ResourceType string `json:"resourceType"`
			}
			if err := json.Unmarshal(raw, &head); err != nil {
				return err
			}
			r, err := parseRow(head.ResourceType, raw)
			if err != nil {
				return err
			}
			select {
			case out <- r:
			case <-ctx.Done():
				return ctx.Err()
			}
		}
		return nil
	}
	return load(ctx, pool, table, produce, groups, nil)
}

// parseRow reads the columns of a resource of type typ from its JSON.
func parseRow(typ string, body []byte) (row, error) {
	var v struct {
		ID   string `json:"id"`
		Meta struct {
			LastUpdated string `json:"lastUpdated"`
		} `json:"meta"`
		Subject *struct{ Reference string } `json:"subject"`
		Patient *struct{ Reference string } `json:"patient"`
	}
	if err := json.Unmarshal(body, &v); err != nil {
		return row{}, fmt.Errorf("%s: %w", typ, err)
	}
	at, err := fhirbulk.ParseInstant(v.Meta.LastUpdated)
	if err != nil {
		return row{}, fmt.Errorf("%s/%s: meta.lastUpdated: %w", typ, v.ID, err)
	}
	r := row{typ: typ, id: v.ID, lastUpdated: at, body: body}
	switch {
	case typ == "Patient":
		r.patient = v.ID
	case v.Subject != nil && strings.HasPrefix(v.Subject.Reference, "Patient/"):
		r.patient = strings.TrimPrefix(v.Subject.Reference, "Patient/")
	case v.Patient != nil && strings.HasPrefix(v.Patient.Reference, "Patient/"):
		r.patient = strings.TrimPrefix(v.Patient.Reference, "Patient/")
	}
	return r, nil
}

// rowWriter turns what dataset.Export writes into rows.
type rowWriter struct {
	ctx context.Context
	typ string
	out chan<- row
}

func (w *rowWriter) Write(resource []byte) error {
	r, err := parseRow(w.typ, append([]byte(nil), resource...))
	if err != nil {
		return err
	}
	select {
	case w.out <- r:
		return nil
	case <-w.ctx.Done():
		return w.ctx.Err()
	}
}

func (w *rowWriter) Deleted(string, time.Time) error { return nil }
func (w *rowWriter) Issue(fhirbulk.Issue) error      { return nil }
func (w *rowWriter) Checkpoint(string) error         { return nil }

// load runs the schema, empties the tables and copies what produce sends,
// and the groups, in one transaction.
func load(ctx context.Context, pool *pgxpool.Pool, table string, produce func(context.Context, chan<- row) error,
	groups map[string][]string, names map[string]string) (err error) {
	t, err := newTables(table)
	if err != nil {
		return err
	}
	tx, err := pool.Begin(ctx)
	if err != nil {
		return fmt.Errorf("pgsource: load: %w", err)
	}
	defer func() {
		if err != nil {
			_ = tx.Rollback(context.WithoutCancel(ctx))
		}
	}()
	for _, stmt := range schema(t, table) {
		if _, err := tx.Exec(ctx, stmt); err != nil {
			return fmt.Errorf("pgsource: load: %w", err)
		}
	}
	if _, err := tx.Exec(ctx, `TRUNCATE `+t.members+`, `+t.groups+`, `+t.resources+` RESTART IDENTITY`); err != nil {
		return fmt.Errorf("pgsource: load: %w", err)
	}

	pctx, cancel := context.WithCancel(ctx)
	defer cancel()
	ch := make(chan row, 256)
	perr := make(chan error, 1)
	go func() {
		defer close(ch)
		perr <- produce(pctx, ch)
	}()
	src := &rowSource{ch: ch}
	_, cerr := tx.CopyFrom(ctx, pgx.Identifier(strings.Split(table, ".")),
		[]string{"type", "id", "patient", "last_updated", "body"}, src)
	cancel()
	for range ch { // let the producer finish
	}
	if err := <-perr; err != nil && !(cerr != nil && errors.Is(err, context.Canceled)) {
		return fmt.Errorf("pgsource: load: %w", err)
	}
	if cerr != nil {
		return fmt.Errorf("pgsource: load: copy: %w", cerr)
	}

	var grows, mrows [][]any
	for g, members := range groups {
		grows = append(grows, []any{g, names[g]})
		for _, p := range members {
			mrows = append(mrows, []any{g, p})
		}
	}
	if _, err := tx.CopyFrom(ctx, pgx.Identifier(strings.Split(table+"_groups", ".")), []string{"id", "name"}, pgx.CopyFromRows(grows)); err != nil {
		return fmt.Errorf("pgsource: load: groups: %w", err)
	}
	if _, err := tx.CopyFrom(ctx, pgx.Identifier(strings.Split(table+"_members", ".")), []string{"group_id", "patient"}, pgx.CopyFromRows(mrows)); err != nil {
		return fmt.Errorf("pgsource: load: members: %w", err)
	}
	// Fresh statistics, so that the planner sees how large Groups are.
	if _, err := tx.Exec(ctx, `ANALYZE `+t.resources+`, `+t.groups+`, `+t.members); err != nil {
		return fmt.Errorf("pgsource: load: %w", err)
	}
	if err := tx.Commit(ctx); err != nil {
		return fmt.Errorf("pgsource: load: %w", err)
	}
	return nil
}

// rowSource is a pgx.CopyFromSource over a channel of rows.
type rowSource struct {
	ch  <-chan row
	cur row
}

func (s *rowSource) Next() bool {
	r, ok := <-s.ch
	s.cur = r
	return ok
}

func (s *rowSource) Values() ([]any, error) {
	var patient any
	if s.cur.patient != "" {
		patient = s.cur.patient
	}
	return []any{s.cur.typ, s.cur.id, patient, s.cur.lastUpdated, s.cur.body}, nil
}

func (s *rowSource) Err() error { return nil }
