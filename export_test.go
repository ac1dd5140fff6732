package bulkexport

// NewStalledWorker is NewWorker for tests of a worker whose heartbeats
// stall past its lease: it accepts a Heartbeat longer than the Lease,
// which NewWorker refuses.
func NewStalledWorker(store JobStore, src Source, storage Storage, opts *WorkerOptions) (*Worker, error) {
	return newWorker(store, src, storage, opts, true)
}
