package sourcetest

import (
	"context"
	"errors"
	"fmt"
	"slices"

	"github.com/bulkfhir/bulkexport"
	"github.com/bulkfhir/bulkexport/bulkexporttest"
)

// The Partitioner checks. A Source that splits nothing of the small
// Dataset (its threshold is larger) passes them with a note; the Worker
// check (Worker/Exports) runs partitioned whenever the Source is a
// Partitioner, as the test server's MemoryStore keeps units.

// partitionMaxes are the limits the checks ask Partitions for.
var partitionMaxes = []int{2, 3, 8}

// partitionQueries are the queries the checks split: every level, and the
// filters a Source may apply when it splits.
func (e *sourceEnv) partitionQueries() []*bulkexport.Query {
	qs := []*bulkexport.Query{e.sys(), e.pat()}
	qs = append(qs, e.groups()...)
	return append(qs,
		with(e.sys(), func(q *bulkexport.Query) { q.Since = e.p.since }),
		with(e.grp(e.p.group), func(q *bulkexport.Query) { q.Patients = e.p.mixed }),
		with(e.pat(), func(q *bulkexport.Query) { q.Since, q.Until = e.p.from, e.p.to }),
	)
}

// partitions asks for the parts of typ and checks that there are at most
// max.
func (e *sourceEnv) partitions(ctx context.Context, p bulkexport.Partitioner, q *bulkexport.Query, typ string, max int) ([]string, error) {
	qc := *q
	tokens, err := p.Partitions(ctx, &qc, typ, max)
	if err != nil {
		return nil, fmt.Errorf("Partitions(%s, max %d): %w", e.describe(q, typ), max, err)
	}
	if len(tokens) > max {
		return nil, fmt.Errorf("Partitions(%s, max %d) returned %d tokens: the Worker fails such a job", e.describe(q, typ), max, len(tokens))
	}
	return tokens, nil
}

// checkPartitions splits every type of every query and exports each part
// with Query.Partition: together the parts must write exactly what the
// query selects, each resource once.
func checkPartitions(ctx context.Context, e *sourceEnv) error {
	p, ok := e.src.(bulkexport.Partitioner)
	if !ok {
		return skip("the Source is no bulkexport.Partitioner: each type of a job is exported by one Export call, on one worker")
	}
	var errs []error
	split := 0
	for _, q := range e.partitionQueries() {
		types, err := e.types(ctx, q.Level)
		if err != nil {
			return err
		}
		for _, typ := range types {
			for _, max := range partitionMaxes {
				tokens, err := e.partitions(ctx, p, q, typ, max)
				if err != nil {
					errs = append(errs, err)
					continue
				}
				if len(tokens) == 0 {
					continue
				}
				if len(tokens) > 1 {
					split++
				}
				var all []string
				for _, tok := range tokens {
					pq := *q
					pq.Partition = tok
					var rec bulkexporttest.Recorder
					if err := e.export(ctx, &pq, typ, &rec); err != nil {
						errs = append(errs, fmt.Errorf("%s: %w", e.describe(&pq, typ), err))
						continue
					}
					ids, err := lineIDs(typ, rec.Resources)
					if err != nil {
						errs = append(errs, fmt.Errorf("%s: %w", e.describe(&pq, typ), err))
						continue
					}
					all = append(all, ids...)
				}
				if err := compareIDs(fmt.Sprintf("%s in the %d parts %q together", e.describe(q, typ), len(tokens), tokens), e.m.want(q, typ), all); err != nil {
					errs = append(errs, fmt.Errorf("%w (every resource the query selects belongs to exactly one part)", err))
				}
			}
		}
	}
	if split == 0 {
		e.note("Partitions never split a type of the Dataset (too small for the Source's threshold?): the parts were not checked")
	}
	return errors.Join(errs...)
}

// checkPartitionResume exports each part of each type at system level and
// resumes it from its first, middle and last cursor: the rest of that
// part, and nothing of the others.
func checkPartitionResume(ctx context.Context, e *sourceEnv) error {
	p, ok := e.src.(bulkexport.Partitioner)
	if !ok {
		return skip("the Source is no bulkexport.Partitioner: each type of a job is exported by one Export call, on one worker")
	}
	q := e.sys()
	types, err := e.types(ctx, q.Level)
	if err != nil {
		return err
	}
	var errs []error
	resumed := 0
	for _, typ := range types {
		tokens, err := e.partitions(ctx, p, q, typ, 3)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		if len(tokens) < 2 {
			continue
		}
		for _, tok := range tokens {
			pq := *q
			pq.Partition = tok
			var full bulkexporttest.Recorder
			if err := e.export(ctx, &pq, typ, &full); err != nil {
				errs = append(errs, fmt.Errorf("%s: %w", e.describe(&pq, typ), err))
				continue
			}
			ids, err := lineIDs(typ, full.Resources)
			if err != nil {
				errs = append(errs, fmt.Errorf("%s: %w", e.describe(&pq, typ), err))
				continue
			}
			var cps []bulkexporttest.Checkpoint
			for _, cp := range full.Checkpoints {
				if cp.Cursor != "" {
					cps = append(cps, cp)
				}
			}
			if len(cps) > 3 {
				cps = []bulkexporttest.Checkpoint{cps[0], cps[len(cps)/2], cps[len(cps)-1]}
			}
			for _, cp := range cps {
				rq := pq
				rq.Cursor = cp.Cursor
				var rest bulkexporttest.Recorder
				if err := e.export(ctx, &rq, typ, &rest); err != nil {
					errs = append(errs, fmt.Errorf("%s: %w", e.describe(&rq, typ), err))
					continue
				}
				got, err := lineIDs(typ, rest.Resources)
				if err != nil {
					errs = append(errs, fmt.Errorf("%s: %w", e.describe(&rq, typ), err))
					continue
				}
				resumed++
				want := slices.Clone(ids[cp.Written:])
				slices.Sort(want)
				if err := compareIDsAs(e.describe(&rq, typ), want, got, "before the cursor or in another part"); err != nil {
					errs = append(errs, fmt.Errorf("%w (the cursor was passed to Checkpoint after %d of the part's %d resources)", err, cp.Written, len(ids)))
				}
			}
		}
	}
	if resumed == 0 {
		e.note("no part of a split type was resumed (no split, or no Checkpoint calls)")
	}
	return errors.Join(errs...)
}
