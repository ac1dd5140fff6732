package sqlitestore

import (
	"context"
	"database/sql/driver"
	"embed"
	"errors"
	"fmt"
	"io/fs"
	"path"
	"sort"
	"strconv"
	"strings"
	"time"
)

// The embedded migrations name their objects after the default table,
// quoted; render replaces that name with the store's table.
//
//go:embed migrations/*.sql
var migrationFS embed.FS

// DefaultTable is the jobs table's name when Options.Table is empty. The
// schema's other objects are named after the table: "<table>_schema_version",
// "<table>_claim_idx", "<table>_lease_idx", "<table>_expires_idx",
// "<table>_owner_idx", and the units table "<table>_units" with its index
// "<table>_units_claim_idx".
const DefaultTable = "bulkexport_jobs"

// versionTableDDL creates the table in which Migrate records the migrations
// it applied, one row each.
const versionTableDDL = `CREATE TABLE IF NOT EXISTS "bulkexport_jobs_schema_version" (
    version    INTEGER NOT NULL PRIMARY KEY,
    name       TEXT    NOT NULL,
    applied_at INTEGER NOT NULL
) STRICT;`

// Migration is one step of the store's schema, as Migrate applies it.
// Hosts that manage their schema with their own tool get them from
// Store.Migrations.
type Migration struct {
	// Version numbers the migrations 1, 2, 3, ... in the order they apply.
	Version int
	// Name is the migration's file name without its number and extension,
	// such as "create_jobs".
	Name string
	// SQL is the migration's statements, separated by semicolons, with the
	// store's table name in place of the default one.
	SQL string
}

// migrations are the embedded migrations for DefaultTable, in order.
var migrations = mustLoadMigrations(migrationFS)

func mustLoadMigrations(fsys fs.FS) []Migration {
	ms, err := loadMigrations(fsys)
	if err != nil {
		panic("sqlitestore: embedded migrations: " + err.Error())
	}
	return ms
}

// loadMigrations reads files named NNNN_name.sql from fsys's migrations
// folder and checks that their numbers run 1, 2, 3, ... without gaps.
func loadMigrations(fsys fs.FS) ([]Migration, error) {
	names, err := fs.Glob(fsys, "migrations/*.sql")
	if err != nil {
		return nil, err
	}
	var ms []Migration
	for _, name := range names {
		base := strings.TrimSuffix(path.Base(name), ".sql")
		num, label, ok := strings.Cut(base, "_")
		v, err := strconv.Atoi(num)
		if !ok || err != nil || v <= 0 || label == "" {
			return nil, fmt.Errorf("%s: want a name like 0001_create_jobs.sql", name)
		}
		b, err := fs.ReadFile(fsys, name)
		if err != nil {
			return nil, err
		}
		ms = append(ms, Migration{Version: v, Name: label, SQL: string(b)})
	}
	sort.Slice(ms, func(i, j int) bool { return ms[i].Version < ms[j].Version })
	for i, m := range ms {
		if m.Version != i+1 {
			return nil, fmt.Errorf("migration %d (%s): want version %d; versions must run 1, 2, 3, ... without gaps", m.Version, m.Name, i+1)
		}
	}
	if len(ms) == 0 {
		return nil, errors.New("no migrations")
	}
	return ms, nil
}

// render puts table in place of the default table name in the schema text
// sql. Every object of the schema is named "bulkexport_jobs" or starts with
// "bulkexport_jobs_", always inside double quotes.
func render(sql, table string) string {
	if table == DefaultTable {
		return sql
	}
	return strings.ReplaceAll(sql, `"`+DefaultTable, `"`+table)
}

// Migrations returns the schema's migrations, oldest first, written for the
// store's table. Migrate applies them; a host that runs migrations with its
// own tool applies them in order instead (see the package documentation).
func (s *Store) Migrations() []Migration {
	out := make([]Migration, len(migrations))
	for i, m := range migrations {
		m.SQL = render(m.SQL, s.table)
		out[i] = m
	}
	return out
}

// SchemaVersionTable returns the DDL of the table in which Migrate records
// the migrations it applied, for the store's table. A host that applies
// Migrations itself and may later call Migrate creates it too and inserts a
// row (version, name, applied_at) for each migration it applied.
func (s *Store) SchemaVersionTable() string {
	return render(versionTableDDL, s.table)
}

// Migrate brings the database's schema up to date: it switches the database
// to WAL journal mode (and fails if SQLite refuses, as it does for an
// in-memory database), then applies, in one IMMEDIATE transaction, every
// embedded migration that the "<table>_schema_version" table does not list
// yet, recording each. It is idempotent: a second call finds every
// migration applied and changes nothing. Several processes may call it at
// once; the IMMEDIATE transaction makes them take turns.
//
// Migrate fails if the database records a schema version newer than this
// package knows: an older binary must not write to a newer schema.
func (s *Store) Migrate(ctx context.Context) error {
	if err := s.enableWAL(ctx); err != nil {
		return err
	}
	conn, err := s.db.Conn(ctx)
	if err != nil {
		return fmt.Errorf("sqlitestore: migrate: %w", err)
	}
	defer conn.Close()

	if _, err := conn.ExecContext(ctx, "BEGIN IMMEDIATE"); err != nil {
		return fmt.Errorf("sqlitestore: migrate: begin: %w", err)
	}
	committed := false
	defer func() {
		if committed {
			return
		}
		// Roll back even when ctx is done. A connection whose transaction
		// cannot be rolled back must not go back to the pool: ErrBadConn
		// from Raw makes database/sql discard it.
		if _, err := conn.ExecContext(context.WithoutCancel(ctx), "ROLLBACK"); err != nil {
			_ = conn.Raw(func(any) error { return driver.ErrBadConn })
		}
	}()

	if _, err := conn.ExecContext(ctx, s.SchemaVersionTable()); err != nil {
		return fmt.Errorf("sqlitestore: migrate: create version table: %w", err)
	}
	var current int
	q := fmt.Sprintf(`SELECT COALESCE(MAX(version), 0) FROM "%s_schema_version"`, s.table)
	if err := conn.QueryRowContext(ctx, q).Scan(&current); err != nil {
		return fmt.Errorf("sqlitestore: migrate: read schema version: %w", err)
	}
	latest := migrations[len(migrations)-1].Version
	if current > latest {
		return fmt.Errorf("sqlitestore: migrate: table %s has schema version %d, newer than this package's %d", s.table, current, latest)
	}
	record := fmt.Sprintf(`INSERT INTO "%s_schema_version" (version, name, applied_at) VALUES (?, ?, ?)`, s.table)
	for _, m := range s.Migrations()[current:] {
		for _, stmt := range splitStatements(m.SQL) {
			if _, err := conn.ExecContext(ctx, stmt); err != nil {
				return fmt.Errorf("sqlitestore: migrate: migration %d (%s): %w", m.Version, m.Name, err)
			}
		}
		if _, err := conn.ExecContext(ctx, record, m.Version, m.Name, time.Now().UnixMicro()); err != nil {
			return fmt.Errorf("sqlitestore: migrate: record migration %d: %w", m.Version, err)
		}
	}
	if _, err := conn.ExecContext(ctx, "COMMIT"); err != nil {
		return fmt.Errorf("sqlitestore: migrate: commit: %w", err)
	}
	committed = true
	return nil
}

// enableWAL sets the journal mode to WAL, which the database file keeps,
// and checks that SQLite took it.
func (s *Store) enableWAL(ctx context.Context) error {
	var mode string
	if err := s.db.QueryRowContext(ctx, "PRAGMA journal_mode = WAL").Scan(&mode); err != nil {
		return fmt.Errorf("sqlitestore: migrate: set journal_mode: %w", err)
	}
	if !strings.EqualFold(mode, "wal") {
		return fmt.Errorf("sqlitestore: migrate: journal_mode is %q after setting WAL; the store needs a database file on a local file system", mode)
	}
	return nil
}

// splitStatements splits schema text into statements: it drops comment
// lines and ends a statement at each line that ends with a semicolon. The
// embedded migrations are written to that rule (no triggers, no semicolons
// inside literals), so that no driver needs to run several statements in
// one Exec.
func splitStatements(sql string) []string {
	var (
		out []string
		cur strings.Builder
	)
	for _, line := range strings.Split(sql, "\n") {
		trimmed := strings.TrimSpace(line)
		if trimmed == "" || strings.HasPrefix(trimmed, "--") {
			continue
		}
		cur.WriteString(line)
		cur.WriteByte('\n')
		if strings.HasSuffix(trimmed, ";") {
			out = append(out, strings.TrimSpace(cur.String()))
			cur.Reset()
		}
	}
	if s := strings.TrimSpace(cur.String()); s != "" {
		out = append(out, s)
	}
	return out
}
