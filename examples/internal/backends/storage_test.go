package backends

import (
	"context"
	"testing"

	"github.com/stretchr/testify/require"
)

// TestOpenStorageWithoutCloudDrivers: the default build links no cloud
// SDK; a cloud bucket URL says how to get the driver instead of failing
// obscurely.
func TestOpenStorageWithoutCloudDrivers(t *testing.T) {
	t.Parallel()
	for url, want := range map[string]string{
		"s3://bucket?region=eu-west-1": "no S3 driver; build with the cloud drivers: go run -tags cloud ./examples/server",
		"gs://bucket":                  "no Google Cloud Storage driver",
		"azblob://container":           "no Azure Blob Storage driver",
		"ftp://host/x":                 `no driver for "ftp" buckets`,
	} {
		spec, err := ParseStorageSpec("blob:" + url)
		require.NoError(t, err)
		_, _, err = OpenStorage(context.Background(), spec)
		require.ErrorContains(t, err, want, url)
	}
	spec, err := ParseStorageSpec("blob:mem://")
	require.NoError(t, err)
	s, closeFn, err := OpenStorage(context.Background(), spec)
	require.NoError(t, err)
	require.NotNil(t, s)
	require.NoError(t, closeFn())
}
