package main

import (
	"context"
	"fmt"
	"strings"

	"github.com/bulkfhir/bulkexport"
	"github.com/bulkfhir/bulkexport/examples/internal/dataset"
	"github.com/bulkfhir/bulkexport/examples/internal/pgsource"
	"github.com/bulkfhir/bulkexport/fhirbulk"
	"github.com/jackc/pgx/v5/pgxpool"
)

// pgDataTable is the table -data postgres:URL loads the dataset into.
const pgDataTable = "bulkexport_resources"

// parseData parses -data: "memory" gives "", "postgres:URL" the URL.
func parseData(s string) (pgURL string, err error) {
	if s == "memory" {
		return "", nil
	}
	if url, ok := strings.CutPrefix(s, "postgres:"); ok && url != "" {
		return url, nil
	}
	return "", fmt.Errorf("%q is not memory or postgres:URL", s)
}

// openPGSource loads the synthetic dataset of the given size into the
// table pgDataTable of the database at url (replacing what it held) and
// returns a pgsource.Source over it, with a func that closes the pool.
func openPGSource(ctx context.Context, url string, patients int) (bulkexport.Source, func(), error) {
	pool, err := pgxpool.New(ctx, url)
	if err != nil {
		return nil, nil, fmt.Errorf("-data: %w", err)
	}
	d := dataset.New(patients)
	if err := pgsource.Load(ctx, pool, d, pgDataTable); err != nil {
		pool.Close()
		return nil, nil, fmt.Errorf("-data: %w", err)
	}
	// The types are the dataset's: no scan of the table to find them.
	system, _ := d.ResourceTypes(ctx, fhirbulk.LevelSystem)
	patient, _ := d.ResourceTypes(ctx, fhirbulk.LevelPatient)
	src, err := pgsource.New(pool, pgsource.Options{Table: pgDataTable, SystemTypes: system, PatientTypes: patient})
	if err != nil {
		pool.Close()
		return nil, nil, err
	}
	return src, pool.Close, nil
}

// dataDesc names the -data source for the logs, without the URL (which
// may hold a password).
func dataDesc(pgURL string) string {
	if pgURL == "" {
		return "memory"
	}
	return "postgres:" + pgDataTable
}
