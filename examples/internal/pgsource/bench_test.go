package pgsource

import (
	"context"
	"io"
	"testing"
	"time"

	"github.com/bulkfhir/bulkexport"
	"github.com/bulkfhir/bulkexport/examples/internal/dataset"
	"github.com/bulkfhir/bulkexport/fhirbulk"
)

// discard is a ResourceWriter that drops everything, counting bytes.
type discard struct{ bytes, n int64 }

func (d *discard) Write(b []byte) error            { d.bytes += int64(len(b)); d.n++; return nil }
func (d *discard) Deleted(string, time.Time) error { return nil }
func (d *discard) Issue(fhirbulk.Issue) error      { return nil }
func (d *discard) Checkpoint(string) error         { return nil }

// countWriter is io.Discard counting bytes.
type countWriter struct{ n int64 }

func (c *countWriter) Write(b []byte) (int, error) { c.n += int64(len(b)); return len(b), nil }

var _ io.Writer = (*countWriter)(nil)

// BenchmarkExportVsCopy exports every Observation of a 5,000-patient
// dataset through the Source (keyset pages of DefaultPageSize) and, in the
// same iteration, reads the same bodies with COPY (SELECT body ...) TO
// STDOUT in binary format, the least the server can do to hand them over.
// ratio is the Source's time over COPY's. In "all-types" the table holds
// the whole dataset (COPY's query then scans all of it); in "one-type"
// only the Observations are left.
func BenchmarkExportVsCopy(b *testing.B) {
	for _, oneType := range []bool{false, true} {
		name := "all-types"
		if oneType {
			name = "one-type"
		}
		b.Run(name, func(b *testing.B) { benchExportVsCopy(b, oneType) })
	}
}

func benchExportVsCopy(b *testing.B, oneType bool) {
	ctx := context.Background()
	src, pool, table := loadDataset(b, dataset.New(5000), DefaultPageSize)
	const typ = "Observation"
	if oneType {
		if _, err := pool.Exec(ctx, `DELETE FROM `+table+` WHERE type <> '`+typ+`'`); err != nil {
			b.Fatal(err)
		}
		if _, err := pool.Exec(ctx, `VACUUM ANALYZE `+table); err != nil {
			b.Fatal(err)
		}
	}
	q := &bulkexport.Query{Level: fhirbulk.LevelSystem}
	copySQL := `COPY (SELECT body FROM ` + src.tables.resources + ` WHERE type = '` + typ + `') TO STDOUT (FORMAT binary)`

	conn, err := pool.Acquire(ctx)
	if err != nil {
		b.Fatal(err)
	}
	defer conn.Release()

	var exportTime, copyTime time.Duration
	var rows, bodyBytes, copyBytes int64
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		var w discard
		start := time.Now()
		if err := src.Export(ctx, q, typ, &w); err != nil {
			b.Fatal(err)
		}
		exportTime += time.Since(start)

		var c countWriter
		start = time.Now()
		if _, err := conn.Conn().PgConn().CopyTo(ctx, &c, copySQL); err != nil {
			b.Fatal(err)
		}
		copyTime += time.Since(start)
		rows, bodyBytes, copyBytes = w.n, w.bytes, c.n
	}
	b.StopTimer()
	b.ReportMetric(float64(exportTime.Microseconds())/1000/float64(b.N), "export-ms/op")
	b.ReportMetric(float64(copyTime.Microseconds())/1000/float64(b.N), "copy-ms/op")
	b.ReportMetric(float64(exportTime)/float64(copyTime), "ratio")
	b.ReportMetric(float64(rows), "resources")
	b.SetBytes(bodyBytes)
	b.Logf("%d %s resources, %d body bytes; COPY sent %d bytes", rows, typ, bodyBytes, copyBytes)
}
