package backends

import (
	"context"
	"fmt"
	"net/url"
	"strings"

	"gocloud.dev/blob"
	// The gocloud drivers every build opens blob: URLs with; each
	// registers its URL scheme on blob.DefaultMux. The cloud drivers (S3,
	// GCS, Azure) pull in their SDKs, hundreds of packages: programs link
	// them only when asked for (the example server with -tags cloud, see
	// examples/server/cloud.go).
	_ "gocloud.dev/blob/fileblob" // file:///PATH
	_ "gocloud.dev/blob/memblob"  // mem://

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

// cloudSchemes are the bucket URL schemes of the drivers linked in only by
// the cloud build tag, with the name of their service.
var cloudSchemes = map[string]string{"s3": "S3", "gs": "Google Cloud Storage", "azblob": "Azure Blob Storage"}

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
		u, err := url.Parse(spec.URL)
		if err != nil {
			return nil, nil, fmt.Errorf("backends: %s: %w", spec, err)
		}
		if !blob.DefaultURLMux().ValidBucketScheme(u.Scheme) {
			if hint, ok := cloudSchemes[u.Scheme]; ok {
				return nil, nil, fmt.Errorf("backends: %s: this build has no %s driver; build with the cloud drivers: go run -tags cloud ./examples/server", spec, hint)
			}
			return nil, nil, fmt.Errorf("backends: %s: no driver for %q buckets (file://, mem://, and with -tags cloud s3://, gs://, azblob://)", spec, u.Scheme)
		}
		bucket, err := blob.OpenBucket(ctx, spec.URL)
		if err != nil {
			return nil, nil, fmt.Errorf("backends: opening %s: %w", spec, err)
		}
		s, err := blobstorage.New(bucket, nil)
		if err != nil {
			_ = bucket.Close()
			return nil, nil, err
		}
		return s, bucket.Close, nil
	}
	return nil, nil, fmt.Errorf("backends: unknown storage kind %q", spec.Kind)
}
