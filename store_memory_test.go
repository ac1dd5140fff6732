package bulkexport_test

import (
	"testing"

	"github.com/bulkfhir/bulkexport"
	"github.com/bulkfhir/bulkexport/storetest"
)

func TestMemoryStore(t *testing.T) {
	storetest.Run(t, func(*testing.T) bulkexport.JobStore { return bulkexport.NewMemoryStore() })
}
