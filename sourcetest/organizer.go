package sourcetest

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/bulkfhir/bulkexport"
	"github.com/bulkfhir/bulkexport/bulkexporttest"
	"github.com/bulkfhir/bulkexport/fhirbulk"
)

// The Organizer checks cover organizeOutputBy=Patient, the only type the
// Dataset's compartments describe.
const organizeBy = "Patient"

// organizer returns the Source's Organizer, or a skip error saying what
// the host loses without one.
func (e *sourceEnv) organizer() (bulkexport.Organizer, error) {
	org, ok := e.src.(bulkexport.Organizer)
	if !ok {
		return nil, skip("the Source is no bulkexport.Organizer: a kick-off with organizeOutputBy gets 400 (not supported), and clients get one file set per type only")
	}
	return org, nil
}

// organizes reports whether output can be organized by Patient at level,
// or returns a skip error when it cannot at any level.
func (e *sourceEnv) organizes(ctx context.Context, org bulkexport.Organizer, level fhirbulk.Level) (bool, error) {
	found := false
	for _, l := range []fhirbulk.Level{fhirbulk.LevelSystem, fhirbulk.LevelPatient, fhirbulk.LevelGroup} {
		by, err := org.OrganizeTypes(ctx, l)
		if err != nil {
			return false, fmt.Errorf("OrganizeTypes(%s): %w", l, err)
		}
		if slices.Contains(by, organizeBy) {
			found = true
			if l == level {
				return true, nil
			}
		}
	}
	if !found {
		return false, skip("OrganizeTypes lists %s at no level: only organizeOutputBy=%s is checked", organizeBy, organizeBy)
	}
	e.note("OrganizeTypes(%s) does not list %s: not checked at that level", level, organizeBy)
	return false, nil
}

// checkOrganizeTypes checks that every level answers, without duplicates
// or malformed type names.
func checkOrganizeTypes(ctx context.Context, e *sourceEnv) error {
	org, err := e.organizer()
	if err != nil {
		return err
	}
	var errs []error
	for _, level := range []fhirbulk.Level{fhirbulk.LevelSystem, fhirbulk.LevelPatient, fhirbulk.LevelGroup} {
		by, err := org.OrganizeTypes(ctx, level)
		if err != nil {
			errs = append(errs, fmt.Errorf("OrganizeTypes(%s): %w", level, err))
			continue
		}
		seen := map[string]bool{}
		for _, typ := range by {
			if seen[typ] {
				errs = append(errs, fmt.Errorf("OrganizeTypes(%s) lists %s twice: %v", level, typ, by))
			}
			seen[typ] = true
			if typ == "" || strings.ContainsAny(typ, "/,? ") {
				errs = append(errs, fmt.Errorf("OrganizeTypes(%s) lists %q, which is no resource type", level, typ))
			}
		}
		if len(by) > 0 && !seen[organizeBy] {
			e.note("OrganizeTypes(%s) = %v: only organizeOutputBy=%s is checked", level, by, organizeBy)
		}
	}
	return errors.Join(errs...)
}

// blockRecorder is a Recorder that also notes calls out of order: a Write
// outside a block, before the first StartBlock or after a Checkpoint
// (the cursor must fall between blocks: a resumed export starts a new
// block).
type blockRecorder struct {
	bulkexporttest.Recorder
	open     bool
	problems []string
}

func (b *blockRecorder) StartBlock(ref string) error {
	b.open = true
	return b.Recorder.StartBlock(ref)
}

func (b *blockRecorder) Write(resource []byte) error {
	if !b.open && len(b.problems) < 3 {
		where := "before the first StartBlock"
		if len(b.Blocks) > 0 {
			where = "after a Checkpoint, without a new StartBlock: a Checkpoint must fall between blocks"
		}
		b.problems = append(b.problems, fmt.Sprintf("wrote %.80s %s", resource, where))
	}
	return b.Recorder.Write(resource)
}

func (b *blockRecorder) Checkpoint(cursor string) error {
	b.open = false
	return b.Recorder.Checkpoint(cursor)
}

// exportBlocks calls ExportBlocks, giving up after exportTimeout.
func (e *sourceEnv) exportBlocks(ctx context.Context, org bulkexport.Organizer, q *bulkexport.Query, types []string, w bulkexport.BlockWriter) error {
	done := make(chan error, 1)
	qc := *q
	go func() { done <- org.ExportBlocks(ctx, &qc, organizeBy, slices.Clone(types), w) }()
	select {
	case err := <-done:
		return err
	case <-time.After(exportTimeout):
		return fmt.Errorf("ExportBlocks did not return within %v", exportTimeout)
	}
}

// describeBlocks names an ExportBlocks call in failure messages.
func (e *sourceEnv) describeBlocks(q *bulkexport.Query, types []string) string {
	d := e.describe(q, "")
	_, rest, _ := strings.Cut(d, " at ")
	return fmt.Sprintf("ExportBlocks(by %s, %s) at %s", organizeBy, strings.Join(types, ","), rest)
}

// selectsPatient reports whether q selects the patient id, its times
// aside: at Group level a member, with the patient parameter one of them.
func (e *sourceEnv) selectsPatient(q *bulkexport.Query, id string) bool {
	if q.Level == fhirbulk.LevelGroup && !slices.Contains(e.m.groups[q.GroupID], id) {
		return false
	}
	if q.Level != fhirbulk.LevelSystem && len(q.Patients) > 0 && !slices.Contains(q.Patients, id) {
		return false
	}
	return true
}

// blockStructure checks how a run's blocks are formed: each a
// "Patient/<id>" of a patient q selects, once; each resource a JSON object
// of one of types, of the Dataset, in the Patient compartment of its
// block; the Patient itself first. It returns the resources as "Type/id"
// in the order written.
func (e *sourceEnv) blockStructure(what string, q *bulkexport.Query, types []string, rec *blockRecorder) ([]string, []error) {
	var errs []error
	for _, p := range rec.problems {
		errs = append(errs, fmt.Errorf("%s: %s", what, p))
	}
	errs = append(errs, e.blockRefs(what, q, rec)...)

	keys := make([]string, 0, len(rec.Resources))
	block := -1
	for i, raw := range rec.Resources {
		for block+1 < len(rec.Blocks) && rec.Blocks[block+1].Start <= i {
			block++
		}
		var v struct {
			ResourceType string `json:"resourceType"`
			ID           string `json:"id"`
		}
		if err := json.Unmarshal(raw, &v); err != nil || v.ResourceType == "" || v.ID == "" {
			errs = append(errs, fmt.Errorf("%s: wrote a resource that is not a JSON object with resourceType and id: %.100s", what, raw))
			continue
		}
		key := v.ResourceType + "/" + v.ID
		keys = append(keys, key)
		r, known := e.m.byRef[key]
		switch {
		case !slices.Contains(types, v.ResourceType):
			errs = append(errs, fmt.Errorf("%s: wrote %s, of a type not asked for", what, key))
		case !known:
			errs = append(errs, fmt.Errorf("%s: wrote %s, which is not in the Dataset", what, key))
		case block < 0:
			// Reported by the blockRecorder.
		case r.patient == "":
			errs = append(errs, fmt.Errorf("%s: wrote %s in the block of %s: it belongs to no patient and is in no block", what, key, rec.Blocks[block].Ref))
		case organizeBy+"/"+r.patient != rec.Blocks[block].Ref:
			errs = append(errs, fmt.Errorf("%s: wrote %s in the block of %s: it belongs to Patient/%s", what, key, rec.Blocks[block].Ref, r.patient))
		case v.ResourceType == organizeBy && i != rec.Blocks[block].Start:
			errs = append(errs, fmt.Errorf("%s: %s is not the first resource of its block", what, key))
		}
	}
	return keys, errs
}

// blockRefs checks the StartBlock calls: each of a patient q selects, once.
func (e *sourceEnv) blockRefs(what string, q *bulkexport.Query, rec *blockRecorder) []error {
	var errs []error
	seen := map[string]bool{}
	var empty []string
	for i, b := range rec.Blocks {
		end := len(rec.Resources)
		if i+1 < len(rec.Blocks) {
			end = rec.Blocks[i+1].Start
		}
		if end == b.Start {
			empty = append(empty, b.Ref)
		}
		typ, id, ok := strings.Cut(b.Ref, "/")
		switch {
		case !ok || typ != organizeBy || id == "" || strings.Contains(id, "/"):
			errs = append(errs, fmt.Errorf("%s: StartBlock(%q): want %s/<id>", what, b.Ref, organizeBy))
		case seen[b.Ref]:
			errs = append(errs, fmt.Errorf("%s: two blocks of %s: each instance gets one", what, b.Ref))
		case e.m.byRef[b.Ref].id == "":
			errs = append(errs, fmt.Errorf("%s: a block of %s, which is not in the Dataset", what, b.Ref))
		case !e.selectsPatient(q, id):
			errs = append(errs, fmt.Errorf("%s: a block of %s, which the query does not select", what, b.Ref))
		}
		seen[b.Ref] = true
	}
	if empty != nil {
		e.note("%s: blocks with nothing in them (a header alone): %v", what, empty)
	}
	return errs
}

// wantBlocks returns the resources ("Type/id", sorted) that ExportBlocks
// must write for q: those of types that q selects and that belong to a
// patient.
func (e *sourceEnv) wantBlocks(q *bulkexport.Query, types []string) []string {
	var want []string
	for _, typ := range types {
		for _, id := range e.m.want(q, typ) {
			if e.m.byRef[typ+"/"+id].patient != "" {
				want = append(want, typ+"/"+id)
			}
		}
	}
	slices.Sort(want)
	return want
}

// blockTypes returns the types to organize at q's level, or nil when the
// Source does not organize output by Patient there.
func (e *sourceEnv) blockTypes(ctx context.Context, org bulkexport.Organizer, level fhirbulk.Level) ([]string, error) {
	ok, err := e.organizes(ctx, org, level)
	if err != nil || !ok {
		return nil, err
	}
	types, err := e.types(ctx, level)
	if err != nil {
		return nil, err
	}
	if !slices.Contains(types, organizeBy) {
		// As the Worker does: the organizing type is always among them.
		types = append(types, organizeBy)
	}
	return types, nil
}

// systemBlocks is the Organizer, a system-level query and the types an
// organized export of it holds, or a skip when the Source does not
// organize output at system level.
func (e *sourceEnv) systemBlocks(ctx context.Context) (bulkexport.Organizer, *bulkexport.Query, []string, error) {
	org, err := e.organizer()
	if err != nil {
		return nil, nil, nil, err
	}
	q := e.sys()
	types, err := e.blockTypes(ctx, org, q.Level)
	if err != nil {
		return nil, nil, nil, err
	}
	if types == nil {
		return nil, nil, nil, skip("OrganizeTypes(%s) does not list %s", q.Level, organizeBy)
	}
	return org, q, types, nil
}

// checkBlocks runs ExportBlocks over several queries and type lists: every
// resource selected is written once, in the block of its patient.
func checkBlocks(ctx context.Context, e *sourceEnv) error {
	org, err := e.organizer()
	if err != nil {
		return err
	}
	var runs []*bulkexport.Query
	runs = append(runs, e.sys(),
		with(e.pat(), func(q *bulkexport.Query) { q.Patients = e.p.patients }),
		with(e.grp(e.p.group), func(q *bulkexport.Query) { q.Since = e.p.since }),
		with(e.grp(e.p.group), func(q *bulkexport.Query) { q.Until, q.Patients = e.p.until, e.p.mixed }),
	)
	var errs []error
	checked := 0
	for i, q := range runs {
		types, err := e.blockTypes(ctx, org, q.Level)
		if err != nil {
			return err
		}
		if types == nil {
			continue
		}
		if i == len(runs)-1 {
			// Some of the types only: the Patient and one other.
			for _, typ := range types {
				if typ != organizeBy {
					types = []string{organizeBy, typ}
					break
				}
			}
		}
		checked++
		what := e.describeBlocks(q, types)
		var rec blockRecorder
		if err := e.exportBlocks(ctx, org, q, types, &rec); err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", what, err))
			continue
		}
		got, serrs := e.blockStructure(what, q, types, &rec)
		errs = append(errs, serrs...)
		if err := compareIDs(what, e.wantBlocks(q, types), got); err != nil {
			errs = append(errs, err)
		}
	}
	if checked == 0 {
		return skip("OrganizeTypes lists %s at none of the levels checked", organizeBy)
	}
	return errors.Join(errs...)
}

// checkBlocksResume resumes ExportBlocks from its first, middle and last
// cursor: it writes exactly the resources after the cursor, starting with
// a new block.
func checkBlocksResume(ctx context.Context, e *sourceEnv) error {
	org, q, types, err := e.systemBlocks(ctx)
	if err != nil {
		return err
	}
	what := e.describeBlocks(q, types)
	var full blockRecorder
	if err := e.exportBlocks(ctx, org, q, types, &full); err != nil {
		return fmt.Errorf("%s: %w", what, err)
	}
	keys, errs := e.blockStructure(what, q, types, &full)
	if len(keys) != len(full.Resources) {
		return errors.Join(errs...)
	}
	var cps []bulkexporttest.Checkpoint
	for _, cp := range full.Checkpoints {
		if cp.Cursor != "" {
			cps = append(cps, cp)
		}
	}
	if len(cps) == 0 {
		e.note("ExportBlocks never calls Checkpoint: an interrupted organized export starts over")
		return errors.Join(errs...)
	}
	if len(cps) > 3 {
		cps = []bulkexporttest.Checkpoint{cps[0], cps[len(cps)/2], cps[len(cps)-1]}
	}
	for _, cp := range cps {
		rq := *q
		rq.Cursor = cp.Cursor
		rwhat := fmt.Sprintf("%s from cursor %q", what, cp.Cursor)
		var rest blockRecorder
		if err := e.exportBlocks(ctx, org, &rq, types, &rest); err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", rwhat, err))
			continue
		}
		got, serrs := e.blockStructure(rwhat, &rq, types, &rest)
		errs = append(errs, serrs...)
		want := slices.Clone(keys[cp.Written:])
		slices.Sort(want)
		if err := compareIDsAs(rwhat, want, got, "already written before the cursor"); err != nil {
			errs = append(errs, fmt.Errorf("%w (the cursor was passed to Checkpoint after %d of %d resources)", err, cp.Written, len(keys)))
		}
	}
	return errors.Join(errs...)
}

// checkBlocksWriteFails fails the second Write: ExportBlocks must stop and
// return an error.
func checkBlocksWriteFails(ctx context.Context, e *sourceEnv) error {
	org, q, types, err := e.systemBlocks(ctx)
	if err != nil {
		return err
	}
	what := e.describeBlocks(q, types)
	rec := blockRecorder{Recorder: bulkexporttest.Recorder{OnWrite: func(n int) error {
		if n >= 1 {
			return errStorage
		}
		return nil
	}}}
	err = e.exportBlocks(ctx, org, q, types, &rec)
	var errs []error
	switch {
	case err == nil:
		errs = append(errs, fmt.Errorf("%s returned nil after Write failed: the Worker would record the export as complete with resources missing", what))
	case strings.Contains(err.Error(), "did not return"):
		return fmt.Errorf("%s with a failing Write: %w", what, err)
	}
	if n := rec.Writes(); n > 2 {
		errs = append(errs, fmt.Errorf("%s called Write %d more times after it failed", what, n-2))
	}
	return errors.Join(errs...)
}

// checkBlocksCancel cancels the context in the first Write, and calls
// ExportBlocks with a context that is already done.
func checkBlocksCancel(ctx context.Context, e *sourceEnv) error {
	org, q, types, err := e.systemBlocks(ctx)
	if err != nil {
		return err
	}
	what := e.describeBlocks(q, types)
	var errs []error

	cctx, cancel := context.WithCancel(ctx)
	mid := blockRecorder{Recorder: bulkexporttest.Recorder{OnWrite: func(n int) error {
		if n == 0 {
			cancel()
			return nil
		}
		return cctx.Err()
	}}}
	err = e.exportBlocks(cctx, org, q, types, &mid)
	cancel()
	switch {
	case err != nil && strings.Contains(err.Error(), "did not return"):
		errs = append(errs, fmt.Errorf("%s cancelled after its first resource: %w", what, err))
	case mid.Writes() > 2:
		errs = append(errs, fmt.Errorf("%s called Write %d more times after Write returned the cancelled context's error", what, mid.Writes()-2))
	}

	dctx, cancel := context.WithCancel(ctx)
	cancel()
	var before blockRecorder
	err = e.exportBlocks(dctx, org, q, types, &before)
	want := len(e.wantBlocks(q, types))
	switch {
	case err != nil && strings.Contains(err.Error(), "did not return"):
		errs = append(errs, fmt.Errorf("%s with a cancelled context: %w", what, err))
	case want >= 5 && len(before.Resources) >= want:
		errs = append(errs, fmt.Errorf("%s with a cancelled context wrote all %d resources: it does not look at ctx", what, want))
	}
	return errors.Join(errs...)
}

// checkBlocksWorker runs an organized export through the real handler and
// Worker: the files hold every selected resource once, after the header of
// its patient's block.
func checkBlocksWorker(ctx context.Context, e *sourceEnv) (err error) {
	org, err := e.organizer()
	if err != nil {
		return err
	}
	q := &bulkexport.Query{Level: fhirbulk.LevelPatient, Since: e.p.from}
	types, err := e.blockTypes(ctx, org, q.Level)
	if err != nil {
		return err
	}
	if types == nil {
		return skip("OrganizeTypes(%s) does not list %s", q.Level, organizeBy)
	}
	srv, stop, err := e.startServer()
	if err != nil {
		return err
	}
	defer func() { err = errors.Join(err, stop()) }()

	path := "/Patient/$export?organizeOutputBy=" + organizeBy + "&_type=" + strings.Join(types, ",") +
		"&_since=" + fhirbulk.FormatInstant(e.p.from)
	res, err := srv.ExportContext(ctx, path)
	if err != nil {
		return fmt.Errorf("Worker: %s: %w", path, err)
	}
	var errs []error
	for typ := range res.Output {
		if typ != "" {
			errs = append(errs, fmt.Errorf("Worker: %s: output has a file of %s: organized files have no type", path, typ))
		}
	}
	var got []string
	block := ""
	for _, raw := range res.Output[""] {
		var v struct {
			ResourceType string `json:"resourceType"`
			ID           string `json:"id"`
			Parameter    []struct {
				Name           string `json:"name"`
				ValueReference struct {
					Reference string `json:"reference"`
				} `json:"valueReference"`
			} `json:"parameter"`
		}
		if err := json.Unmarshal(raw, &v); err != nil {
			errs = append(errs, fmt.Errorf("Worker: %s: %w", path, err))
			continue
		}
		if v.ResourceType == "Parameters" && len(v.Parameter) > 0 && v.Parameter[0].Name == "header" {
			block = v.Parameter[0].ValueReference.Reference
			continue
		}
		key := v.ResourceType + "/" + v.ID
		got = append(got, key)
		if r := e.m.byRef[key]; r.patient != "" && organizeBy+"/"+r.patient != block {
			errs = append(errs, fmt.Errorf("Worker: %s: %s follows the header of %q, not of Patient/%s", path, key, block, r.patient))
		}
	}
	if err := compareIDs("Worker: "+path, e.wantBlocks(q, types), got); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}
