// Package bulkexporttest helps hosts test code that uses bulkexport, in
// the spirit of net/http/httptest. It uses only the standard library. To
// check a Source against the contract the Worker relies on, see package
// sourcetest, which builds on this one.
//
//   - NewServer runs the real handler and Worker on an httptest.Server over
//     a MemoryStore and a temporary DirStorage, with the host's Source or
//     the in-memory one, and shuts them down with the test. Its helpers
//     (Export, Collect, Kickoff, Wait, Cancel, ...) make a test read "kick
//     off, wait, assert". StartServer is the same without a testing.TB.
//   - Exporter runs the same helpers against any server, such as the
//     host's own router with the handler mounted inside.
//   - Source is an in-memory Source: resources added as JSON or Go values,
//     failures (FailOn), pauses (Pause) and delays on demand.
//   - Recorder is a ResourceWriter (and BlockWriter) that keeps what a
//     Source writes, for tests that call Export or ExportBlocks directly;
//     Clock is a clock that moves only when told.
//
// A typical host test:
//
//	srv := bulkexporttest.NewServer(t, &bulkexporttest.ServerOptions{Source: mySource})
//	res := srv.Export(t, "/Group/g1/$export?_type=Patient,Observation")
//	if got := res.IDs("Patient"); !slices.Equal(got, []string{"p1", "p2"}) {
//		t.Errorf("exported Patients %v", got)
//	}
package bulkexporttest
