package backends

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	_ "modernc.org/sqlite" // the SQLite driver sqlitestore is tested with

	"github.com/bulkfhir/bulkexport"
	"github.com/bulkfhir/bulkexport/examples/internal/exampleserver"
	"github.com/bulkfhir/bulkexport/pgstore"
	"github.com/bulkfhir/bulkexport/sqlitestore"
)

// StoreMemory names the MemoryStore: jobs live in memory and are lost on
// restart.
const StoreMemory = exampleserver.StoreMemory

// DefaultStore is the example server's job store: a SQLite file in the
// working directory, so that jobs survive a restart.
const DefaultStore = "sqlite:./bulkexport.db"

// StoreSpec is a parsed -store value.
type StoreSpec struct {
	// Kind is "memory", "sqlite" or "postgres".
	Kind string
	// Path is the SQLite database file (Kind "sqlite").
	Path string
	// URL is the PostgreSQL connection string (Kind "postgres"): a
	// postgres:// URL or key=value pairs, as pgx parses them.
	URL string
}

// ParseStoreSpec parses a job store spec: "memory", "sqlite:PATH" or
// "postgres:URL" (for example postgres:postgres://user@host/db).
func ParseStoreSpec(spec string) (StoreSpec, error) {
	if spec == StoreMemory {
		return StoreSpec{Kind: StoreMemory}, nil
	}
	kind, rest, ok := strings.Cut(spec, ":")
	switch {
	case ok && kind == "sqlite" && rest != "":
		if strings.ContainsAny(rest, "?#") {
			return StoreSpec{}, fmt.Errorf("store %q: the SQLite path may not contain ? or #", spec)
		}
		return StoreSpec{Kind: kind, Path: rest}, nil
	case ok && kind == "postgres" && rest != "":
		if _, err := pgxpool.ParseConfig(rest); err != nil {
			// pgx's message may quote the URL, password included.
			return StoreSpec{}, errors.New("store postgres:URL: the URL does not parse as a PostgreSQL connection string")
		}
		return StoreSpec{Kind: kind, URL: rest}, nil
	}
	return StoreSpec{}, fmt.Errorf("unsupported store %q: use memory, sqlite:PATH or postgres:URL", spec)
}

// String returns the spec in the form ParseStoreSpec reads, without the
// PostgreSQL URL (it may hold a password).
func (s StoreSpec) String() string {
	switch s.Kind {
	case "sqlite":
		return "sqlite:" + s.Path
	case "postgres":
		return "postgres:…"
	}
	return s.Kind
}

// StoreOptions tunes OpenStore.
type StoreOptions struct {
	// PGSchema is the PostgreSQL schema of the jobs table (pgstore
	// Options.Schema; Migrate creates it). Empty: the connection's
	// search_path.
	PGSchema string
}

// SQLiteDSN is the modernc.org/sqlite data source name of the database
// file at path, with the pragmas docs/sqlitestore.md recommends: WAL,
// a 10 s busy timeout, synchronous=NORMAL.
func SQLiteDSN(path string) string {
	return "file:" + path + "?_pragma=journal_mode(WAL)&_pragma=busy_timeout(10000)" +
		"&_pragma=foreign_keys(1)&_pragma=synchronous(NORMAL)"
}

// OpenStore opens the job store spec names and brings its schema up to
// date (Migrate), so that it is ready for Config.JobStore. The function it
// returns releases the database pool; call it after the Worker and the
// HTTP server have stopped.
func OpenStore(ctx context.Context, spec StoreSpec, opts *StoreOptions) (bulkexport.JobStore, func(), error) {
	var o StoreOptions
	if opts != nil {
		o = *opts
	}
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	switch spec.Kind {
	case StoreMemory:
		return bulkexport.NewMemoryStore(), func() {}, nil
	case "sqlite":
		db, err := sql.Open("sqlite", SQLiteDSN(spec.Path))
		if err != nil {
			return nil, nil, fmt.Errorf("sqlite %s: %w", spec.Path, err)
		}
		db.SetMaxOpenConns(4)
		db.SetMaxIdleConns(4)
		s, err := sqlitestore.New(db, nil)
		if err == nil {
			err = s.Migrate(ctx)
		}
		if err != nil {
			db.Close()
			return nil, nil, fmt.Errorf("sqlite %s: %w", spec.Path, err)
		}
		return s, func() { db.Close() }, nil
	case "postgres":
		cfg, err := pgxpool.ParseConfig(spec.URL)
		if err != nil {
			return nil, nil, errors.New("postgres: the URL does not parse as a PostgreSQL connection string")
		}
		pool, err := pgxpool.NewWithConfig(ctx, cfg)
		if err != nil {
			return nil, nil, fmt.Errorf("postgres: %w", err)
		}
		s, err := pgstore.New(pool, &pgstore.Options{Schema: o.PGSchema})
		if err == nil {
			err = s.Migrate(ctx)
		}
		if err != nil {
			pool.Close()
			return nil, nil, fmt.Errorf("postgres: %w", err)
		}
		return s, pool.Close, nil
	}
	return nil, nil, fmt.Errorf("backends: unsupported store kind %q", spec.Kind)
}
