package pgstore

import (
	"context"
	"embed"
	"fmt"
	"hash/fnv"
	"io/fs"
	"path"
	"slices"
	"strconv"
	"strings"
	"text/template"

	"github.com/jackc/pgx/v5"
)

//go:embed migrations/*.sql
var migrationFiles embed.FS

// Migration is one step of the schema, rendered for a Store's schema and
// table names.
type Migration struct {
	// Version orders the migrations, from 1. Migrate records the applied
	// versions in the migrations table.
	Version int
	// Name is the file name without its version and extension, such as
	// "create_jobs".
	Name string
	// SQL is the migration's statements, ready to run.
	SQL string
}

// Migrations returns the store's migrations in the order they apply, for
// operators who run their schema changes with their own tools. Every
// migration is idempotent (CREATE ... IF NOT EXISTS and the like), so
// running one that Migrate later runs again, or the reverse, is harmless.
// To keep Migrate from running them again, record each applied version in
// the migrations table, as Migrate does.
func (s *Store) Migrations() []Migration {
	return slices.Clone(s.migrations)
}

// loadMigrations parses the embedded files ("0001_name.sql") and renders
// them: {{table}} is the quoted, qualified jobs table, {{index "x"}} the
// quoted index name table+"_x" (an index is created in its table's
// schema, so CREATE INDEX takes it unqualified), {{qualifiedIndex "x"}}
// the same name qualified with the schema, for DROP INDEX, and
// {{unitsTable}} the quoted, qualified units table.
func loadMigrations(schema, table string) ([]Migration, error) {
	qualified := qualify(schema, table)
	names, err := fs.Glob(migrationFiles, "migrations/*.sql")
	if err != nil {
		return nil, err
	}
	funcs := template.FuncMap{
		"table":          func() string { return qualified },
		"index":          func(suffix string) string { return pgx.Identifier{table + "_" + suffix}.Sanitize() },
		"qualifiedIndex": func(suffix string) string { return qualify(schema, table+"_"+suffix) },
		"unitsTable":     func() string { return qualify(schema, table+unitsSuffix) },
	}
	var out []Migration
	for _, name := range names {
		base := strings.TrimSuffix(path.Base(name), ".sql")
		num, rest, ok := strings.Cut(base, "_")
		v, err := strconv.Atoi(num)
		if !ok || err != nil || v < 1 {
			return nil, fmt.Errorf("pgstore: migration file %s: want NNNN_name.sql", name)
		}
		text, err := migrationFiles.ReadFile(name)
		if err != nil {
			return nil, err
		}
		tmpl, err := template.New(base).Funcs(funcs).Parse(string(text))
		if err != nil {
			return nil, fmt.Errorf("pgstore: migration %s: %w", name, err)
		}
		var b strings.Builder
		if err := tmpl.Execute(&b, nil); err != nil {
			return nil, fmt.Errorf("pgstore: migration %s: %w", name, err)
		}
		out = append(out, Migration{Version: v, Name: rest, SQL: b.String()})
	}
	slices.SortFunc(out, func(a, b Migration) int { return a.Version - b.Version })
	for i, m := range out {
		if m.Version != i+1 {
			return nil, fmt.Errorf("pgstore: migrations: version %d where %d was expected", m.Version, i+1)
		}
	}
	return out, nil
}

// migrationsTableDDL creates the table, named by the quoted and qualified
// table, where Migrate records the applied migrations.
func migrationsTableDDL(table string) string {
	return `CREATE TABLE IF NOT EXISTS ` + table + ` (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);`
}

// lockKey is the advisory lock that serialises Migrate, one per schema:
// creating the schema, and tables in it, is not safe to race.
func lockKey(schema string) int64 {
	h := fnv.New64a()
	h.Write([]byte("github.com/bulkfhir/bulkexport/pgstore\x00"))
	h.Write([]byte(schema))
	return int64(h.Sum64())
}

// Migrate brings the schema up to date: it creates Options.Schema when it
// is missing, the migrations table, and applies every migration not yet
// recorded there, in order, in one transaction. It holds a transaction
// advisory lock (pg_advisory_xact_lock) throughout, so that replicas
// starting together take turns: the first applies the migrations and the
// others find them applied. Calling it again is a no-op.
func (s *Store) Migrate(ctx context.Context) error {
	tx, err := s.pool.Begin(ctx)
	if err != nil {
		return fmt.Errorf("pgstore: migrate: %w", err)
	}
	defer tx.Rollback(context.WithoutCancel(ctx)) //nolint:errcheck // a no-op after Commit
	if _, err := tx.Exec(ctx, "SELECT pg_advisory_xact_lock($1)", s.lockKey); err != nil {
		return fmt.Errorf("pgstore: migrate: lock: %w", err)
	}
	if s.schema != "" {
		// CREATE SCHEMA IF NOT EXISTS needs the CREATE privilege on the
		// database even when the schema exists: look first.
		var exists bool
		if err := tx.QueryRow(ctx, "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)", s.schema).Scan(&exists); err != nil {
			return fmt.Errorf("pgstore: migrate: %w", err)
		}
		if !exists {
			if _, err := tx.Exec(ctx, "CREATE SCHEMA IF NOT EXISTS "+pgx.Identifier{s.schema}.Sanitize()); err != nil {
				return fmt.Errorf("pgstore: migrate: create schema: %w", err)
			}
		}
	}
	if _, err := tx.Exec(ctx, migrationsTableDDL(s.migTable)); err != nil {
		return fmt.Errorf("pgstore: migrate: create migrations table: %w", err)
	}
	applied := map[int]bool{}
	rows, err := tx.Query(ctx, "SELECT version FROM "+s.migTable)
	if err != nil {
		return fmt.Errorf("pgstore: migrate: %w", err)
	}
	var v int
	if _, err := pgx.ForEachRow(rows, []any{&v}, func() error { applied[v] = true; return nil }); err != nil {
		return fmt.Errorf("pgstore: migrate: %w", err)
	}
	for _, m := range s.migrations {
		if applied[m.Version] {
			continue
		}
		if _, err := tx.Exec(ctx, m.SQL); err != nil {
			return fmt.Errorf("pgstore: migrate: %d_%s: %w", m.Version, m.Name, err)
		}
		if _, err := tx.Exec(ctx, "INSERT INTO "+s.migTable+" (version, name) VALUES ($1, $2)", m.Version, m.Name); err != nil {
			return fmt.Errorf("pgstore: migrate: record %d_%s: %w", m.Version, m.Name, err)
		}
	}
	if err := tx.Commit(ctx); err != nil {
		return fmt.Errorf("pgstore: migrate: commit: %w", err)
	}
	return nil
}
