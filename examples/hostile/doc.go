// Package hostile sends hostile HTTP requests (NUL bytes and invalid UTF-8
// in kick-off parameter names and values, in Parameters bodies and in job
// ids) to the library's handler over a real HTTP server, once for every
// job store: the in-memory store, SQLite and PostgreSQL (when
// BULKEXPORT_TEST_POSTGRES_URL is set). Each request must get its exact
// 4xx status and OperationOutcome issue code, must leave the store as it
// was, and must not keep the next, well-formed kick-off from succeeding.
//
// The package holds tests only.
package hostile
