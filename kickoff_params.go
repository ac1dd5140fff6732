package bulkexport

import (
	"fmt"
	"github.com/bulkfhir/bulkexport/fhirbulk"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"time"
)

// The parse functions of paramSpecs: each checks the values of one kick-off
// parameter and records them in the request being built (see
// paramSpec.parse). A parameter that may appear only once has one value.

func parseFormat(_ *kickoffParser, name string, vs []string) error {
	if !acceptableFormat(mediaTypePlus(vs[0])) {
		// Not a parameter lenient handling can drop: the answer would
		// not be in the format asked for.
		return &Error{Status: http.StatusNotAcceptable, Code: fhirbulk.IssueNotSupported, Param: name,
			Message: fmt.Sprintf("only FHIR JSON responses are produced, not %q", vs[0])}
	}
	return nil
}

func parseOutputFormat(p *kickoffParser, name string, vs []string) error {
	if !slices.Contains(ndjsonAliases, mediaTypePlus(vs[0])) {
		return p.reject(paramError(name, fhirbulk.IssueNotSupported, "output format %q is not supported; use application/fhir+ndjson", vs[0]))
	}
	return nil
}

func parseSince(p *kickoffParser, name string, vs []string) error {
	return p.instant(name, vs[0], &p.req.Since)
}

func parseUntil(p *kickoffParser, name string, vs []string) error {
	return p.instant(name, vs[0], &p.req.Until)
}

// instant parses a FHIR instant into *dst.
func (p *kickoffParser) instant(name, v string, dst *time.Time) error {
	t, err := fhirbulk.ParseInstant(v)
	if err != nil {
		return p.reject(paramError(name, fhirbulk.IssueInvalid, "%v", err))
	}
	*dst = t
	return nil
}

func parseTypes(p *kickoffParser, name string, vs []string) error {
	for _, t := range vs {
		var perr *Error
		switch {
		case !validTypeName(t):
			perr = paramError(name, fhirbulk.IssueInvalid, "%q is not a resource type", t)
		case p.cfg.types != nil && !slices.Contains(p.cfg.types, t):
			perr = paramError(name, fhirbulk.IssueNotSupported, "resource type %s is not exported at %s level", t, p.level)
		default:
			p.req.Types = appendUnique(p.req.Types, t)
			continue
		}
		if err := p.reject(perr); err != nil {
			return err
		}
	}
	if len(p.req.Types) == 0 {
		// Every listed type was dropped under lenient handling; an
		// empty _type would silently widen the export to every type.
		return paramError(name, fhirbulk.IssueNotSupported, "none of the requested types is exported at %s level", p.level)
	}
	return nil
}

func parseElements(p *kickoffParser, _ string, vs []string) error {
	for _, e := range vs {
		if perr := checkElement(e, &p.req, p.cfg); perr != nil {
			if err := p.reject(perr); err != nil {
				return err
			}
			continue
		}
		p.req.Elements = appendUnique(p.req.Elements, e)
	}
	return nil
}

func parseAssociatedData(p *kickoffParser, name string, vs []string) error {
	for _, v := range vs {
		if !slices.Contains(p.cfg.associated, v) {
			if err := p.reject(paramError(name, fhirbulk.IssueNotSupported, "value %q is not supported", v)); err != nil {
				return err
			}
			continue
		}
		p.req.IncludeAssociatedData = appendUnique(p.req.IncludeAssociatedData, v)
	}
	return nil
}

func parseTypeFilters(p *kickoffParser, _ string, vs []string) error {
	for _, v := range vs {
		// A value with several queries is kept or dropped whole.
		filters, ferr := parseTypeFilterValue(v)
		for _, f := range filters {
			if ferr == nil {
				ferr = checkTypeFilter(f, &p.req, p.cfg)
			}
		}
		if ferr != nil {
			if err := p.reject(ferr); err != nil {
				return err
			}
			continue
		}
		p.req.TypeFilters = append(p.req.TypeFilters, filters...)
	}
	return nil
}

func parseOrganizeOutputBy(p *kickoffParser, name string, vs []string) error {
	switch {
	case !validTypeName(vs[0]):
		return p.reject(paramError(name, fhirbulk.IssueInvalid, "%q is not a resource type", vs[0]))
	case !slices.Contains(p.cfg.organizeBy, vs[0]):
		return p.reject(paramError(name, fhirbulk.IssueNotSupported, "output cannot be organized by %s", vs[0]))
	}
	p.req.OrganizeOutputBy = vs[0]
	return nil
}

func parseAllowPartialManifests(p *kickoffParser, name string, vs []string) error {
	b, err := strconv.ParseBool(vs[0])
	if err != nil || (vs[0] != "true" && vs[0] != "false") {
		return p.reject(paramError(name, fhirbulk.IssueInvalid, "must be true or false, not %q", vs[0]))
	}
	p.req.AllowPartialManifests = b
	return nil
}

func parsePatients(p *kickoffParser, name string, vs []string) error {
	for _, v := range vs {
		id, ok := strings.CutPrefix(v, "Patient/")
		if !ok || !validID(id) {
			// Under lenient handling only this reference is dropped;
			// the others still restrict the export.
			if err := p.reject(paramError(name, fhirbulk.IssueInvalid, "%q is not a Patient reference (Patient/{id})", v)); err != nil {
				return err
			}
			continue
		}
		p.req.Patients = appendUnique(p.req.Patients, id)
	}
	if len(p.req.Patients) == 0 {
		// Every reference was dropped: an empty list would silently
		// widen the export to every patient.
		return paramError(name, fhirbulk.IssueInvalid, "none of the patient references is valid")
	}
	return nil
}

// appendUnique appends v to list unless it is there already.
func appendUnique(list []string, v string) []string {
	if slices.Contains(list, v) {
		return list
	}
	return append(list, v)
}
