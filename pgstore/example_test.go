package pgstore_test

import (
	"context"
	"log"
	"net/http"
	"os"
	"os/signal"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/bulkfhir/bulkexport"
	"github.com/bulkfhir/bulkexport/bulkexporttest"
	"github.com/bulkfhir/bulkexport/pgstore"
)

// One replica of a FHIR server that shares its export jobs with the other
// replicas through PostgreSQL, and its files through a shared volume.
// (The example is compiled, not run: it needs a database.)
func Example() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()

	pool, err := pgxpool.New(ctx, os.Getenv("DATABASE_URL"))
	if err != nil {
		log.Fatal(err)
	}
	defer pool.Close()
	store, err := pgstore.New(pool, &pgstore.Options{Schema: "fhir"})
	if err != nil {
		log.Fatal(err)
	}
	if err := store.Migrate(ctx); err != nil { // every replica; they take turns
		log.Fatal(err)
	}

	storage, err := bulkexport.NewDirStorage("/mnt/shared/bulkexport")
	if err != nil {
		log.Fatal(err)
	}
	h, err := bulkexport.NewHandler(store, &bulkexport.Options{BaseURL: "https://fhir.example.org/fhir", Storage: storage})
	if err != nil {
		log.Fatal(err)
	}
	var source bulkexport.Source = bulkexporttest.NewSource() // your data
	w, err := bulkexport.NewWorker(store, source, storage, nil)
	if err != nil {
		log.Fatal(err)
	}
	go func() {
		if err := w.Run(ctx); err != nil {
			log.Print(err)
		}
	}()

	mux := http.NewServeMux()
	mux.Handle("/fhir/", h)
	srv := &http.Server{Addr: ":8080", Handler: mux}
	go func() {
		<-ctx.Done()
		srv.Close()
	}()
	if err := srv.ListenAndServe(); err != http.ErrServerClosed {
		log.Fatal(err)
	}
}
