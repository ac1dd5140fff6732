package dataset

import (
	"context"
	"fmt"
	"slices"
	"strconv"

	"github.com/bulkfhir/bulkexport"
	"github.com/bulkfhir/bulkexport/fhirbulk"
)

var _ bulkexport.Organizer = (*Dataset)(nil)

// OrganizeTypes implements bulkexport.Organizer: output can be organized
// by Patient at every level.
func (d *Dataset) OrganizeTypes(ctx context.Context, level fhirbulk.Level) ([]string, error) {
	switch level {
	case fhirbulk.LevelSystem, fhirbulk.LevelPatient, fhirbulk.LevelGroup:
		return []string{"Patient"}, nil
	}
	return nil, fmt.Errorf("dataset: unknown export level %q", level)
}

// ExportBlocks implements bulkexport.Organizer for organizeOutputBy=Patient.
// Each selected patient that has something to export gets one block: the
// Patient (when Patient is among types and it matches the query), then its
// Encounters, Conditions, Observations and MedicationRequests, in that
// order, each filtered as Export filters them. A patient with nothing
// selected gets no block. Practitioner and Organization belong to no
// patient's compartment and are left out. The cursor, recorded after
// every block, is the patient's index.
func (d *Dataset) ExportBlocks(ctx context.Context, q *bulkexport.Query, by string, types []string, w bulkexport.BlockWriter) error {
	if by != "Patient" {
		return fmt.Errorf("dataset: output cannot be organized by %s", by)
	}
	// One plan per compartment type, in the dataset's order; the Patient
	// plan also decides which patients are visited (all plans share the
	// level, group, patient list and cursor).
	owners, err := d.newPlan(q, "Patient", true)
	if err != nil {
		return err
	}
	var plans []*plan
	for _, typ := range compartmentTypes {
		if !slices.Contains(types, typ) {
			continue
		}
		p, err := d.newPlan(q, typ, true)
		if err != nil {
			return err
		}
		plans = append(plans, p)
	}
	if q.Cursor == "" {
		if err := owners.reportMissing(q, w); err != nil {
			return err
		}
	}
	var r rec
	var buf []byte // the block's resources, one after another
	var ends []int // where each resource ends in buf
	var ref, cursor []byte
	return owners.each(ctx, func(idx int) error {
		buf, ends = buf[:0], ends[:0]
		for _, p := range plans {
			err := p.resources(idx, &r, func(r *rec) error {
				buf = encode(buf, r, p.keep)
				ends = append(ends, len(buf))
				return nil
			})
			if err != nil {
				return err
			}
		}
		if len(ends) > 0 {
			ref = strconv.AppendInt(append(ref[:0], "Patient/p-"...), int64(idx), 10)
			if err := w.StartBlock(string(ref)); err != nil {
				return err
			}
			start := 0
			for _, end := range ends {
				if err := w.Write(buf[start:end]); err != nil {
					return err
				}
				start = end
			}
		}
		cursor = strconv.AppendInt(cursor[:0], int64(idx), 10)
		return w.Checkpoint(string(cursor))
	})
}
