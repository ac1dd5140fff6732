// Package pgsource is a bulkexport.Source over resources kept in one
// PostgreSQL table, the way many Go FHIR servers keep them: one row per
// resource with its type, id, Patient compartment owner, lastUpdated and
// the resource's JSON as bytes.
//
// Export streams a type with keyset pagination on a sequence key (never
// OFFSET), pushes the level, Group membership, the patient parameter,
// _since, _until and the transaction time into SQL, writes each body as
// stored, and checkpoints with the last key written, so that a resumed job
// continues after it. docs/pgsource.md describes the schema and why.
//
// It is also a bulkexport.Partitioner: Partitions splits a type into
// ranges of the sequence key with about equal row counts, which Workers
// export as separate units (partition.go).
//
// Load fills the tables from the example dataset (package dataset); New
// serves any tables of that shape.
package pgsource

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"
	"regexp"
	"strconv"
	"strings"
	"sync"

	"github.com/bulkfhir/bulkexport"
	"github.com/bulkfhir/bulkexport/fhirbulk"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// DefaultPageSize is the number of rows one keyset page reads.
const DefaultPageSize = 1000

// Options configure a Source.
type Options struct {
	// Table is the resources table (Load's; an unquoted identifier,
	// optionally schema-qualified: "fhir.resources"). Group membership is
	// in Table+"_groups" and Table+"_members".
	Table string
	// PageSize is the number of rows per keyset page (and so between
	// checkpoints). Default: DefaultPageSize.
	PageSize int
	// SystemTypes and PatientTypes are the types ResourceTypes lists at
	// system level and at Patient and Group level, in export order. When
	// SystemTypes is nil, the first ResourceTypes call reads them from the
	// table (one scan of it) and keeps them.
	SystemTypes, PatientTypes []string
	// EstimateCounts makes Count return PostgreSQL's planner estimate of
	// the rows Export reads (an EXPLAIN, no scan) instead of counting
	// them: progress percentages become approximate, and a large table is
	// not read once more per type just to show them. Default: false, an
	// exact count(*).
	EstimateCounts bool
}

// Source is a bulkexport.Source over a resources table. It is safe for
// concurrent use.
type Source struct {
	pool     *pgxpool.Pool
	tables   tables
	pageSize int
	estimate bool

	mu                        sync.Mutex
	systemTypes, patientTypes []string
}

var (
	_ bulkexport.Source            = (*Source)(nil)
	_ bulkexport.GroupChecker      = (*Source)(nil)
	_ bulkexport.TypeFilterChecker = (*Source)(nil)
	_ bulkexport.Counter           = (*Source)(nil)
	_ bulkexport.Partitioner       = (*Source)(nil)
)

// tables holds the quoted names of a Source's tables.
type tables struct {
	resources, groups, members string
}

var identRE = regexp.MustCompile(`^[a-z_][a-z0-9_]{0,40}(\.[a-z_][a-z0-9_]{0,40})?$`)

func newTables(table string) (tables, error) {
	if !identRE.MatchString(table) {
		return tables{}, fmt.Errorf("pgsource: table name %q: want a lower-case identifier, optionally schema-qualified", table)
	}
	quote := func(suffix string) string {
		return pgx.Identifier(strings.Split(table+suffix, ".")).Sanitize()
	}
	return tables{resources: quote(""), groups: quote("_groups"), members: quote("_members")}, nil
}

// New returns a Source over the tables Load creates.
func New(pool *pgxpool.Pool, opts Options) (*Source, error) {
	t, err := newTables(opts.Table)
	if err != nil {
		return nil, err
	}
	if opts.PageSize <= 0 {
		opts.PageSize = DefaultPageSize
	}
	return &Source{pool: pool, tables: t, pageSize: opts.PageSize, estimate: opts.EstimateCounts,
		systemTypes: opts.SystemTypes, patientTypes: opts.PatientTypes}, nil
}

// ResourceTypes implements bulkexport.Source.
func (s *Source) ResourceTypes(ctx context.Context, level fhirbulk.Level) ([]string, error) {
	switch level {
	case fhirbulk.LevelSystem, fhirbulk.LevelPatient, fhirbulk.LevelGroup:
	default:
		return nil, fmt.Errorf("pgsource: unknown export level %q", level)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.systemTypes == nil {
		if err := s.discoverTypes(ctx); err != nil {
			return nil, err
		}
	}
	if level == fhirbulk.LevelSystem {
		return append([]string(nil), s.systemTypes...), nil
	}
	return append([]string(nil), s.patientTypes...), nil
}

// discoverTypes reads the types in the table, in the order of their first
// row; those with a compartment owner are exported at Patient and Group
// level too.
func (s *Source) discoverTypes(ctx context.Context) error {
	rows, err := s.pool.Query(ctx, `SELECT type, bool_or(patient IS NOT NULL) FROM `+s.tables.resources+
		` GROUP BY type ORDER BY min(seq)`)
	if err != nil {
		return fmt.Errorf("pgsource: resource types: %w", err)
	}
	system, patient := []string{}, []string{}
	var typ string
	var compartment bool
	_, err = pgx.ForEachRow(rows, []any{&typ, &compartment}, func() error {
		system = append(system, typ)
		if compartment {
			patient = append(patient, typ)
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("pgsource: resource types: %w", err)
	}
	s.systemTypes, s.patientTypes = system, patient
	return nil
}

// CheckGroup implements bulkexport.GroupChecker: a Group is known when it
// has a row in the groups table (it may have no members).
func (s *Source) CheckGroup(ctx context.Context, groupID string) error {
	var ok bool
	err := s.pool.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM `+s.tables.groups+` WHERE id = $1)`, groupID).Scan(&ok)
	if err != nil {
		return fmt.Errorf("pgsource: Group/%s: %w", groupID, err)
	}
	if !ok {
		return fmt.Errorf("pgsource: Group/%s: %w", groupID, bulkexport.ErrNotFound)
	}
	return nil
}

// CheckTypeFilter implements bulkexport.TypeFilterChecker: the Source runs
// no search parameters, so every _typeFilter is rejected at kick-off (400,
// or dropped under lenient handling) rather than silently ignored.
func (s *Source) CheckTypeFilter(typ string, query url.Values) error {
	return fmt.Errorf("_typeFilter is not supported by this server (%s)", typ)
}

// where builds Count's WHERE clause for typ, with its arguments: the
// query's filters and its partition's range of seq (see partition.go).
func (s *Source) where(q *bulkexport.Query, typ string) (string, []any, error) {
	return s.conditions(q, typ, true)
}

// conditions builds the WHERE clause of q's filters for typ, with the
// partition's range of seq when withRange is set.
func (s *Source) conditions(q *bulkexport.Query, typ string, withRange bool) (string, []any, error) {
	for _, tf := range q.TypeFilters {
		if tf.Type == typ {
			return "", nil, &bulkexport.Error{Status: http.StatusBadRequest, Code: fhirbulk.IssueNotSupported,
				Param: "_typeFilter", Message: fmt.Sprintf("%s: _typeFilter is not supported", tf)}
		}
	}
	args := []any{typ}
	conds := []string{"type = $1"}
	add := func(cond string, arg any) {
		args = append(args, arg)
		conds = append(conds, strings.ReplaceAll(cond, "$?", "$"+strconv.Itoa(len(args))))
	}
	switch q.Level {
	case fhirbulk.LevelSystem:
	case fhirbulk.LevelPatient:
		conds = append(conds, "patient IS NOT NULL")
	case fhirbulk.LevelGroup:
		add("patient IN (SELECT patient FROM "+s.tables.members+" WHERE group_id = $?)", q.GroupID)
	default:
		return "", nil, fmt.Errorf("pgsource: unknown export level %q", q.Level)
	}
	if len(q.Patients) > 0 && q.Level != fhirbulk.LevelSystem {
		add("patient = ANY($?)", q.Patients)
	}
	if !q.Since.IsZero() {
		add("last_updated > $?", q.Since)
	}
	if !q.Until.IsZero() {
		add("last_updated < $?", q.Until)
	}
	if !q.TransactionTime.IsZero() {
		add("last_updated <= $?", q.TransactionTime)
	}
	r, err := parseRange(q.Partition)
	if err != nil {
		return "", nil, err
	}
	if !withRange {
		r = wholeRange
	}
	if !r.openBelow() {
		add("seq > $?", r.lo)
	}
	if !r.openAbove() {
		add("seq <= $?", r.hi)
	}
	return strings.Join(conds, " AND "), args, nil
}

// Count implements bulkexport.Counter: COUNT(*) with Export's WHERE
// clause (within q.Partition's range), from the start (the cursor is ignored, so that progress counts
// what a resumed job wrote before).
func (s *Source) Count(ctx context.Context, q *bulkexport.Query, typ string) (int64, error) {
	where, args, err := s.where(q, typ)
	if err != nil {
		return 0, err
	}
	if s.estimate {
		return s.estimateRows(ctx, typ, where, args)
	}
	var n int64
	if err := s.pool.QueryRow(ctx, `SELECT count(*) FROM `+s.tables.resources+` WHERE `+where, args...).Scan(&n); err != nil {
		return 0, fmt.Errorf("pgsource: count %s: %w", typ, err)
	}
	return n, nil
}

// estimateRows is the planner's estimate of the rows that where selects
// (Options.EstimateCounts).
func (s *Source) estimateRows(ctx context.Context, typ, where string, args []any) (int64, error) {
	var plan []struct {
		Plan struct {
			Rows float64 `json:"Plan Rows"`
		} `json:"Plan"`
	}
	var raw []byte
	if err := s.pool.QueryRow(ctx, `EXPLAIN (FORMAT JSON) SELECT 1 FROM `+s.tables.resources+` WHERE `+where, args...).Scan(&raw); err != nil {
		return 0, fmt.Errorf("pgsource: estimate %s: %w", typ, err)
	}
	if err := json.Unmarshal(raw, &plan); err != nil || len(plan) == 0 {
		return 0, fmt.Errorf("pgsource: estimate %s: unexpected plan %.100q", typ, raw)
	}
	return int64(plan[0].Plan.Rows), nil
}

// Export implements bulkexport.Source. It reads typ in pages of PageSize
// rows in seq order, each page starting after the last seq of the one
// before (or after q.Cursor), and checkpoints after every page. With
// q.Partition it reads only that range of seq (see Partitions), resuming
// within it.
func (s *Source) Export(ctx context.Context, q *bulkexport.Query, typ string, w bulkexport.ResourceWriter) error {
	part, err := parseRange(q.Partition)
	if err != nil {
		return err
	}
	// A part's upper bound applies outside each page's LIMIT, so that
	// every page is the same range scan of (type, seq) as without a
	// partition. Inside it, next to the lower bound, the planner would
	// underestimate the rows of a type in a narrow range of seq (it takes
	// type and seq as independent) and could read the whole rest of the
	// part, and sort it, for every page.
	where, args, err := s.conditions(q, typ, false)
	if err != nil {
		return err
	}
	var after int64
	if q.Cursor != "" {
		after, err = strconv.ParseInt(q.Cursor, 10, 64)
		if err != nil || after < 0 {
			return fmt.Errorf("pgsource: invalid cursor %q", q.Cursor)
		}
	}
	if !part.openBelow() {
		after = max(after, part.lo)
	}
	// The warnings about unknown patients go before the first checkpoint,
	// once: not again on resume, and of a partitioned type only from the
	// part that is open below (the first).
	if typ == "Patient" && len(q.Patients) > 0 && q.Cursor == "" && q.Level != fhirbulk.LevelSystem && part.openBelow() {
		if err := s.reportMissing(ctx, q, w); err != nil {
			return err
		}
	}
	keep := newKeep(typ, q.Elements)
	n := len(args)
	sql := `SELECT seq, body FROM ` + s.tables.resources + ` WHERE ` + where +
		` AND seq > $` + strconv.Itoa(n+1) + ` ORDER BY seq LIMIT $` + strconv.Itoa(n+2)
	args = append(args, after, s.pageSize)
	if !part.openAbove() {
		args = append(args, part.hi)
		sql = `SELECT seq, body FROM (` + sql + `) AS page WHERE seq <= $` + strconv.Itoa(n+3) + ` ORDER BY seq`
	}
	for {
		args[n] = after
		got, last, err := s.page(ctx, sql, args, keep, w)
		if err != nil {
			return err
		}
		if got == 0 {
			return nil
		}
		after = last
		if err := w.Checkpoint(strconv.FormatInt(after, 10)); err != nil {
			return err
		}
		if got < s.pageSize {
			return nil // the end of the type, or of the part
		}
	}
}

// page runs one keyset page and writes its rows; it returns how many it
// wrote and the last seq.
func (s *Source) page(ctx context.Context, sql string, args []any, keep *keep, w bulkexport.ResourceWriter) (int, int64, error) {
	rows, err := s.pool.Query(ctx, sql, args...)
	if err != nil {
		return 0, 0, fmt.Errorf("pgsource: export: %w", err)
	}
	defer rows.Close()
	var (
		got  int
		last int64
		buf  []byte
	)
	for rows.Next() {
		if err := ctx.Err(); err != nil {
			return got, last, err
		}
		// The body is written from pgx's read buffer, without a copy:
		// Write does not keep it.
		if err := rows.Scan(&last, nil); err != nil {
			return got, last, fmt.Errorf("pgsource: export: %w", err)
		}
		body := rows.RawValues()[1]
		if keep != nil {
			if buf, err = keep.subset(buf[:0], body); err != nil {
				return got, last, fmt.Errorf("pgsource: export: resource at seq %d: %w", last, err)
			}
			body = buf
		}
		if err := w.Write(body); err != nil {
			return got, last, err
		}
		got++
	}
	if err := rows.Err(); err != nil {
		return got, last, fmt.Errorf("pgsource: export: %w", err)
	}
	return got, last, nil
}

// reportMissing writes a warning for every id of the patient parameter
// that names no Patient (or, at Group level, no member of the Group), as
// the example dataset does.
func (s *Source) reportMissing(ctx context.Context, q *bulkexport.Query, w bulkexport.ResourceWriter) error {
	sql := `SELECT id FROM ` + s.tables.resources + ` WHERE type = 'Patient' AND id = ANY($1)`
	args := []any{q.Patients}
	if q.Level == fhirbulk.LevelGroup {
		sql += ` AND id IN (SELECT patient FROM ` + s.tables.members + ` WHERE group_id = $2)`
		args = append(args, q.GroupID)
	}
	rows, err := s.pool.Query(ctx, sql, args...)
	if err != nil {
		return fmt.Errorf("pgsource: patients: %w", err)
	}
	found, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		return fmt.Errorf("pgsource: patients: %w", err)
	}
	known := map[string]bool{}
	for _, id := range found {
		known[id] = true
	}
	for _, id := range q.Patients {
		if known[id] {
			continue
		}
		known[id] = true // once per id
		msg := "Patient/" + id + " is not known; it was left out"
		if q.Level == fhirbulk.LevelGroup {
			msg = "Patient/" + id + " is not a member of Group/" + q.GroupID + "; it was left out"
		}
		if err := w.Issue(fhirbulk.Issue{Severity: fhirbulk.SeverityWarning, Code: fhirbulk.IssueNotFound,
			Diagnostics: msg, Expression: []string{"patient"}}); err != nil {
			return err
		}
	}
	return nil
}

// mandatory lists, per type, the elements _elements never drops besides
// resourceType, id and meta: those FHIR R4 requires (minimum cardinality
// 1) on the types of the example dataset.
var mandatory = map[string][]string{
	"Observation":       {"status", "code"},
	"Condition":         {"subject"},
	"Encounter":         {"status", "class"},
	"MedicationRequest": {"status", "intent", "subject", "medication"},
}

// keep is what _elements keeps of one type.
type keep struct{ names map[string]bool }

func newKeep(typ string, elements []string) *keep {
	if elements == nil {
		return nil
	}
	k := &keep{names: map[string]bool{"resourceType": true, "id": true, "meta": true}}
	for _, e := range append(elements, mandatory[typ]...) {
		k.names[strings.TrimSuffix(e, "[x]")] = true
	}
	return k
}

// keeps reports whether a top-level element is kept; a choice element
// (valueQuantity) is kept by its base name (value).
func (k *keep) keeps(name string) bool {
	if k.names[name] {
		return true
	}
	for i := 1; i < len(name); i++ {
		if name[i] >= 'A' && name[i] <= 'Z' {
			return k.names[name[:i]]
		}
	}
	return false
}

// subsettedTag marks a resource _elements cut.
var subsettedTag = json.RawMessage(`{"system":"http://terminology.hl7.org/CodeSystem/v3-ObservationValue","code":"SUBSETTED"}`)

// subset appends to dst the resource body with only the kept elements and
// a SUBSETTED tag in meta.tag when it dropped any.
func (k *keep) subset(dst, body []byte) ([]byte, error) {
	var m map[string]json.RawMessage
	if err := json.Unmarshal(body, &m); err != nil {
		return nil, err
	}
	cut := false
	for name := range m {
		if !k.keeps(name) {
			delete(m, name)
			cut = true
		}
	}
	if cut {
		var meta map[string]json.RawMessage
		if raw, ok := m["meta"]; ok {
			if err := json.Unmarshal(raw, &meta); err != nil {
				return nil, fmt.Errorf("meta: %w", err)
			}
		}
		if meta == nil {
			meta = map[string]json.RawMessage{}
		}
		var tags []json.RawMessage
		if raw, ok := meta["tag"]; ok {
			if err := json.Unmarshal(raw, &tags); err != nil {
				return nil, fmt.Errorf("meta.tag: %w", err)
			}
		}
		tags = append(tags, subsettedTag)
		var err error
		if meta["tag"], err = json.Marshal(tags); err != nil {
			return nil, err
		}
		if m["meta"], err = json.Marshal(meta); err != nil {
			return nil, err
		}
	}
	out, err := json.Marshal(m)
	if err != nil {
		return nil, err
	}
	return append(dst, out...), nil
}
