package exampleserver

import (
	"context"
	"fmt"
	"net/url"
	"strings"

	"gocloud.dev/blob"
	// The gocloud drivers the example server opens blob: URLs with. Each
	// registers its URL scheme on blob.DefaultMux.
	_ "gocloud.dev/blob/azureblob" // azblob://CONTAINER
	_ "gocloud.dev/blob/fileblob"  // file:///PATH
	_ "gocloud.dev/blob/gcsblob"   // gs://BUCKET
	_ "gocloud.dev/blob/memblob"   // mem://
	_ "gocloud.dev/blob/s3blob"    // s3://BUCKET

	"github.com/bulkfhir/bulkexport"
	"github.com/bulkfhir/bulkexport/blobstorage"
)

// StorageSpec is a parsed -storage flag: dir:PATH (a DirStorage) or
// blob:URL (object storage through gocloud.dev/blob, such as
// blob:s3://bucket?region=eu-west-1, blob:gs://bucket,
// blob:azblob://container, blob:file:///var/lib/exports or blob:mem://).
type StorageSpec struct {
	// Kind is "dir" or "blob".
	Kind string
	// Path is the directory of "dir".
	Path string
	// URL is the bucket URL of "blob".
	URL string
}

// ParseStorageSpec parses dir:PATH or blob:URL.
func ParseStorageSpec(s string) (StorageSpec, error) {
	kind, rest, ok := strings.Cut(s, ":")
	switch {
	case ok && kind == "dir" && rest != "":
		return StorageSpec{Kind: "dir", Path: rest}, nil
	case ok && kind == "blob" && rest != "":
		u, err := url.Parse(rest)
		if err != nil || u.Scheme == "" {
			return StorageSpec{}, fmt.Errorf("%q is not a bucket URL such as s3://bucket, gs://bucket, azblob://container, file:///path or mem://", rest)
		}
		return StorageSpec{Kind: "blob", URL: rest}, nil
	}
	return StorageSpec{}, fmt.Errorf("unsupported storage %q: use dir:PATH or blob:URL", s)
}

// String describes the storage for logs: the bucket URL's scheme, host and
// path, without its query (which may name credentials).
func (s StorageSpec) String() string {
	if s.Kind == "dir" {
		return "dir:" + s.Path
	}
	u, err := url.Parse(s.URL)
	if err != nil {
		return "blob:…"
	}
	u.RawQuery, u.User = "", nil
	return "blob:" + u.String()
}

// OpenStorage opens the storage spec names: a DirStorage for dir:PATH, or
// for blob:URL a blobstorage.Storage over the bucket that blob.OpenBucket
// opens (credentials come from the environment, as each driver documents).
// close closes the bucket.
func OpenStorage(ctx context.Context, spec StorageSpec) (storage bulkexport.Storage, close func() error, err error) {
	switch spec.Kind {
	case "dir":
		s, err := bulkexport.NewDirStorage(spec.Path)
		if err != nil {
			return nil, nil, err
		}
		return s, func() error { return nil }, nil
	case "blob":
		bucket, err := blob.OpenBucket(ctx, spec.URL)
		if err != nil {
			return nil, nil, fmt.Errorf("exampleserver: opening %s: %w", spec, err)
		}
		s, err := blobstorage.New(bucket, nil)
		if err != nil {
			_ = bucket.Close()
			return nil, nil, err
		}
		return s, bucket.Close, nil
	}
	return nil, nil, fmt.Errorf("exampleserver: unknown storage kind %q", spec.Kind)
}
