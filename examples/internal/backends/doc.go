// Package backends opens the job stores and file storages the example
// server's -store and -storage flags name: SQLite (sqlitestore with
// modernc.org/sqlite), PostgreSQL (pgstore with pgx), the MemoryStore, a
// DirStorage, or object storage through blobstorage and gocloud.dev/blob.
//
// It is apart from package exampleserver so that programs that need none of
// them (the demo, on a MemoryStore and a directory) do not compile the
// database drivers and gocloud: a first build of the demo stays fast.
package backends
