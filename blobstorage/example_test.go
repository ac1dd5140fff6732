package blobstorage_test

import (
	"context"
	"fmt"
	"io"

	"gocloud.dev/blob/memblob"

	"github.com/bulkfhir/bulkexport/blobstorage"
)

func ExampleNew() {
	ctx := context.Background()
	// Any gocloud bucket: blob.OpenBucket(ctx, "s3://my-exports?region=eu-west-1")
	// with gocloud.dev/blob/s3blob imported, for instance.
	bucket := memblob.OpenBucket(nil)
	defer bucket.Close()
	files, err := blobstorage.New(bucket, &blobstorage.Options{Prefix: "bulkexport/"})
	if err != nil {
		panic(err)
	}

	w, _ := files.Create(ctx, "job1", "Patient.000001.ndjson")
	_, _ = io.WriteString(w, "{\"resourceType\":\"Patient\",\"id\":\"p1\"}\n")
	if err := w.Commit(); err != nil { // the object appears now, whole
		panic(err)
	}
	names, _ := files.List(ctx, "job1")
	fmt.Println(names, files.Key("job1", names[0]))
	// Output: [Patient.000001.ndjson] bulkexport/job1/Patient.000001.ndjson
}
