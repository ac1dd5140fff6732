// Package crashtest proves that exports survive kill -9: it builds the
// example server, runs it as a subprocess on a loopback port with a durable
// job store (SQLite, or PostgreSQL when BULKEXPORT_TEST_POSTGRES_URL is
// set) and a DirStorage, kicks off exports over HTTP, kills the server
// with SIGKILL at random points mid-export, restarts it on the same store
// and files, and checks the finished exports against the dataset: every
// expected resource exactly once, manifest counts equal to the files'
// line counts, and no file in the storage that the manifest does not list.
//
// The tests are plain Go tests (they run under go test -race with the
// rest; the server binary itself is built without -race) and skip with
// -short. BULKEXPORT_CRASHTEST_SEED replays the random kill delays of an
// earlier run (each test logs its seed).
package crashtest
