package sqlitestore_test

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"log"
	"os"
	"path/filepath"
	"time"

	_ "modernc.org/sqlite" // the driver is the host's choice

	"github.com/bulkfhir/bulkexport"
	"github.com/bulkfhir/bulkexport/fhirbulk"
	"github.com/bulkfhir/bulkexport/sqlitestore"
)

func ExampleNew() {
	dir, err := os.MkdirTemp("", "sqlitestore-example")
	if err != nil {
		log.Fatal(err)
	}
	defer os.RemoveAll(dir)

	// The DSN sets the per-connection pragmas on every pooled connection.
	path := filepath.Join(dir, "jobs.db")
	db, err := sql.Open("sqlite", "file:"+path+
		"?_pragma=journal_mode(WAL)&_pragma=busy_timeout(10000)"+
		"&_pragma=foreign_keys(1)&_pragma=synchronous(NORMAL)")
	if err != nil {
		log.Fatal(err)
	}
	defer db.Close()
	db.SetMaxOpenConns(4)
	db.SetMaxIdleConns(4)

	ctx := context.Background()
	store, err := sqlitestore.New(db, nil)
	if err != nil {
		log.Fatal(err)
	}
	if err := store.Migrate(ctx); err != nil {
		log.Fatal(err)
	}

	// The kick-off handler creates a job...
	now := time.Date(2025, 6, 1, 12, 0, 0, 0, time.UTC)
	job := &bulkexport.Job{
		ID:        "job-1",
		Owner:     "client-1",
		Level:     fhirbulk.LevelSystem,
		State:     bulkexport.StateQueued,
		CreatedAt: now,
		UpdatedAt: now,
	}
	if err := store.Create(ctx, job, bulkexport.CreateParams{}); err != nil {
		log.Fatal(err)
	}

	// ...a worker claims it...
	claimed, err := store.Claim(ctx, bulkexport.ClaimParams{Worker: "worker-1", Now: now, Lease: time.Minute})
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(claimed.ID, claimed.State, claimed.LeaseOwner, claimed.Version)

	// ...and finishes it with a compare-and-set Update.
	claimed.State = bulkexport.StateCompleted
	claimed.ExpiresAt = now.Add(24 * time.Hour)
	if err := store.Update(ctx, claimed); err != nil {
		log.Fatal(err)
	}
	got, err := store.Get(ctx, "job-1")
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(got.State, got.Version, got.ExpiresAt.Format(time.RFC3339))

	// A second Create of the same id is refused.
	err = store.Create(ctx, &bulkexport.Job{ID: "job-1", State: bulkexport.StateQueued}, bulkexport.CreateParams{})
	fmt.Println(errors.Is(err, bulkexport.ErrAlreadyExists))
	// Output:
	// job-1 running worker-1 2
	// completed 3 2025-06-02T12:00:00Z
	// true
}
