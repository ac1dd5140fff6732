// Package scaleout measures how one partitioned export scales across
// worker processes that share a pgstore database: BenchmarkScaleOut runs
// the same job with 1, 2, 4 and 8 workers, each a separate process (the
// test binary started again in worker mode), over a Source whose reads
// take a fixed time per page, as a remote database's do, and reports each
// throughput's ratio to one worker's. It needs PostgreSQL
// (BULKEXPORT_TEST_POSTGRES_URL; `source .ci/postgres.sh` provides one)
// and is skipped without it. See docs/PERFORMANCE.md.
package scaleout
