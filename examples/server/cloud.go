//go:build cloud

package main

// The cloud object storage drivers, for -storage blob:s3://…, blob:gs://…
// and blob:azblob://…. They bring in the AWS, Google Cloud and Azure SDKs
// (hundreds of packages, minutes of a first build), so the default build
// leaves them out: build or run the example server with -tags cloud to
// link them.
import (
	_ "gocloud.dev/blob/azureblob" // azblob://CONTAINER
	_ "gocloud.dev/blob/gcsblob"   // gs://BUCKET
	_ "gocloud.dev/blob/s3blob"    // s3://BUCKET
)
