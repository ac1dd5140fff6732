package dataset

import (
	"strconv"
	"strings"
	"time"
	"unicode/utf8"
)

// This file writes resources as compact FHIR R4 JSON by appending to a
// byte slice, with _elements subsetting applied field by field.

// mandatory lists the elements of each type that _elements never drops
// (besides resourceType, id and meta): those with a minimum cardinality
// of 1 in FHIR R4.
var mandatory = map[kind][]string{
	kindObservation:       {"status", "code"},
	kindCondition:         {"subject"},
	kindEncounter:         {"status", "class"},
	kindMedicationRequest: {"status", "intent", "subject", "medication"},
}

// choices maps the concrete names of the choice elements ([x]) the dataset
// writes to their base name, so that "value", "value[x]" and
// "valueQuantity" all keep Observation.valueQuantity.
var choices = map[kind]map[string]string{
	kindObservation:       {"valueQuantity": "value", "effectiveDateTime": "effective"},
	kindCondition:         {"onsetDateTime": "onset", "abatementDateTime": "abatement"},
	kindMedicationRequest: {"medicationCodeableConcept": "medication"},
}

// elementSet is the parsed _elements of one type. A nil *elementSet keeps
// every element.
type elementSet struct {
	names   map[string]bool
	choices map[string]string
}

// newElementSet returns the set for kind k, or nil when elements is empty
// (no subsetting).
func newElementSet(k kind, elements []string) *elementSet {
	if len(elements) == 0 {
		return nil
	}
	s := &elementSet{names: map[string]bool{}, choices: choices[k]}
	for _, e := range elements {
		s.names[strings.TrimSuffix(e, "[x]")] = true
	}
	for _, e := range mandatory[k] {
		s.names[e] = true
	}
	return s
}

func (s *elementSet) keeps(name string) bool {
	if s == nil || s.names[name] {
		return true
	}
	base, ok := s.choices[name]
	return ok && s.names[base]
}

var (
	clinicalCodings       = []coding{{sysClinical, "active", "Active"}, {sysClinical, "resolved", "Resolved"}}
	verificationConfirmed = coding{sysVerif, "confirmed", "Confirmed"}
	encounterDiagnosis    = coding{sysCondCat, "encounter-diagnosis", "Encounter Diagnosis"}
	orgTypeProvider       = coding{sysOrgType, "prov", "Healthcare Provider"}
)

// subsettedTag is the meta.tag of a resource _elements subsetted.
const subsettedTag = `"tag":[{"system":"http://terminology.hl7.org/CodeSystem/v3-ObservationValue","code":"SUBSETTED","display":"subsetted"}]`

// encoder appends one resource. field writes `,"name":` and reports
// whether the caller should write the value: false when _elements drops it.
type encoder struct {
	b    []byte
	keep *elementSet
}

func (e *encoder) field(name string) bool {
	if !e.keep.keeps(name) {
		return false
	}
	e.b = append(e.b, ',', '"')
	e.b = append(e.b, name...)
	e.b = append(e.b, '"', ':')
	return true
}

func (e *encoder) str(s string)             { e.b = appendString(e.b, s) }
func (e *encoder) raw(s string)             { e.b = append(e.b, s...) }
func (e *encoder) instant(t time.Time)      { e.b = appendInstant(e.b, t) }
func (e *encoder) ref(prefix string, n int) { e.b = appendRef(e.b, prefix, n, 0) }

// appendString appends s as a JSON string.
func appendString(b []byte, s string) []byte {
	const hex = "0123456789abcdef"
	b = append(b, '"')
	for i := 0; i < len(s); {
		c := s[i]
		if c >= 0x20 && c != '"' && c != '\\' && c < utf8.RuneSelf {
			b = append(b, c)
			i++
			continue
		}
		if c >= utf8.RuneSelf {
			r, size := utf8.DecodeRuneInString(s[i:])
			if r == utf8.RuneError && size == 1 {
				b = append(b, `\ufffd`...)
			} else {
				b = append(b, s[i:i+size]...)
			}
			i += size
			continue
		}
		switch c {
		case '"', '\\':
			b = append(b, '\\', c)
		case '\n':
			b = append(b, '\\', 'n')
		case '\t':
			b = append(b, '\\', 't')
		case '\r':
			b = append(b, '\\', 'r')
		default:
			b = append(b, '\\', 'u', '0', '0', hex[c>>4], hex[c&0xf])
		}
		i++
	}
	return append(b, '"')
}

// appendInstant appends t as a quoted FHIR instant in UTC.
func appendInstant(b []byte, t time.Time) []byte {
	b = append(b, '"')
	b = t.UTC().AppendFormat(b, "2006-01-02T15:04:05Z")
	return append(b, '"')
}

// appendRef appends {"reference":"<prefix><n>[-<seq>]"}.
func appendRef(b []byte, prefix string, n, seq int) []byte {
	b = append(b, `{"reference":"`...)
	b = append(b, prefix...)
	b = strconv.AppendInt(b, int64(n), 10)
	if seq > 0 {
		b = append(b, '-')
		b = strconv.AppendInt(b, int64(seq), 10)
	}
	return append(b, `"}`...)
}

func appendCoding(b []byte, c *coding) []byte {
	b = append(b, `{"system":`...)
	b = appendString(b, c.system)
	b = append(b, `,"code":`...)
	b = appendString(b, c.code)
	if c.display != "" {
		b = append(b, `,"display":`...)
		b = appendString(b, c.display)
	}
	return append(b, '}')
}

// appendConcept appends a CodeableConcept with one coding, and its display
// as text when withText.
func appendConcept(b []byte, c *coding, withText bool) []byte {
	b = append(b, `{"coding":[`...)
	b = appendCoding(b, c)
	b = append(b, ']')
	if withText {
		b = append(b, `,"text":`...)
		b = appendString(b, c.display)
	}
	return append(b, '}')
}

// appendTenths appends v/10 as a JSON number.
func appendTenths(b []byte, v int) []byte {
	b = strconv.AppendInt(b, int64(v/10), 10)
	if f := v % 10; f != 0 {
		b = append(b, '.', byte('0'+f))
	}
	return b
}

// appendID appends the id of r, unquoted.
func appendID(b []byte, r *rec) []byte {
	b = append(b, idPrefix[r.kind]...)
	b = strconv.AppendInt(b, int64(r.idx), 10)
	if r.seq > 0 {
		b = append(b, '-')
		b = strconv.AppendInt(b, int64(r.seq), 10)
	}
	return b
}

// encode appends the JSON of r to b.
func encode(b []byte, r *rec, keep *elementSet) []byte {
	e := encoder{b: b, keep: keep}
	e.raw(`{"resourceType":"`)
	e.raw(r.kind.String())
	e.raw(`","id":"`)
	e.b = appendID(e.b, r)
	e.raw(`","meta":{"lastUpdated":`)
	e.instant(r.lastUpdated)
	if keep != nil {
		e.raw(",")
		e.raw(subsettedTag)
	}
	e.raw("}")
	switch r.kind {
	case kindPatient:
		e.patient(r)
	case kindEncounter:
		e.encounter(r)
	case kindCondition:
		e.condition(r)
	case kindObservation:
		e.observation(r)
	case kindMedicationRequest:
		e.medicationRequest(r)
	case kindPractitioner:
		e.practitioner(r)
	case kindOrganization:
		e.organization(r)
	}
	e.raw("}")
	return e.b
}

func (e *encoder) givenName(r *rec) string {
	if genders[r.gender] == "male" {
		return maleNames[r.given]
	}
	return femaleNames[r.given]
}

func (e *encoder) patient(r *rec) {
	if e.field("identifier") {
		e.raw(`[{"use":"usual","type":{"coding":[{"system":"http://terminology.hl7.org/CodeSystem/v2-0203","code":"MR","display":"Medical record number"}]},"system":`)
		e.str(sysMRN)
		e.raw(`,"value":"MRN-`)
		e.b = strconv.AppendInt(e.b, int64(r.mrn), 10)
		e.raw(`"}]`)
	}
	if e.field("active") {
		e.raw("true")
	}
	if e.field("name") {
		e.raw(`[{"use":"official","family":`)
		e.str(familyNames[r.family])
		e.raw(`,"given":[`)
		e.str(e.givenName(r))
		e.raw(`]}]`)
	}
	if e.field("gender") {
		e.str(genders[r.gender])
	}
	if e.field("birthDate") {
		e.raw(`"`)
		e.b = r.birth.AppendFormat(e.b, "2006-01-02")
		e.raw(`"`)
	}
	if e.field("address") {
		e.raw(`[{"use":"home","city":`)
		e.str(cities[r.city])
		e.raw(`}]`)
	}
	if e.field("generalPractitioner") {
		e.raw("[")
		e.ref("Practitioner/pr-", r.gp)
		e.raw("]")
	}
	if e.field("managingOrganization") {
		e.ref("Organization/org-", r.org)
	}
}

func (e *encoder) subject(r *rec) {
	if e.field("subject") {
		e.ref("Patient/p-", r.idx)
	}
}

func (e *encoder) encounterRef(r *rec) {
	if e.field("encounter") {
		e.b = appendRef(e.b, "Encounter/e-", r.idx, r.encounter)
	}
}

func (e *encoder) encounter(r *rec) {
	if e.field("status") {
		e.str(r.status)
	}
	if e.field("class") {
		e.b = appendCoding(e.b, &encounterClasses[r.class])
	}
	if e.field("type") {
		e.raw("[")
		e.b = appendConcept(e.b, &encounterTypes[r.encType], true)
		e.raw("]")
	}
	e.subject(r)
	if e.field("participant") {
		e.raw(`[{"individual":`)
		e.ref("Practitioner/pr-", r.practitioner)
		e.raw("}]")
	}
	if r.status != "cancelled" && e.field("period") {
		e.raw(`{"start":`)
		e.instant(r.start)
		if r.status == "finished" {
			e.raw(`,"end":`)
			e.instant(r.end)
		}
		e.raw("}")
	}
	if e.field("serviceProvider") {
		e.ref("Organization/org-", r.org)
	}
}

func (e *encoder) condition(r *rec) {
	if e.field("clinicalStatus") {
		c := &clinicalCodings[0]
		if r.clinical != c.code {
			c = &clinicalCodings[1]
		}
		e.b = appendConcept(e.b, c, false)
	}
	if e.field("verificationStatus") {
		e.b = appendConcept(e.b, &verificationConfirmed, false)
	}
	if e.field("category") {
		e.raw("[")
		e.b = appendConcept(e.b, &encounterDiagnosis, false)
		e.raw("]")
	}
	if e.field("code") {
		e.b = appendConcept(e.b, r.code, true)
	}
	e.subject(r)
	e.encounterRef(r)
	if e.field("onsetDateTime") {
		e.instant(r.start)
	}
	if r.clinical == "resolved" && e.field("abatementDateTime") {
		e.instant(r.end)
	}
	if e.field("recordedDate") {
		e.instant(r.start)
	}
}

func (e *encoder) observation(r *rec) {
	o := r.obs
	if e.field("status") {
		e.str(r.status)
	}
	if e.field("category") {
		e.raw("[")
		e.b = appendConcept(e.b, &o.category, false)
		e.raw("]")
	}
	if e.field("code") {
		e.b = appendConcept(e.b, &o.code, true)
	}
	e.subject(r)
	e.encounterRef(r)
	if e.field("effectiveDateTime") {
		e.instant(r.start)
	}
	if e.field("issued") {
		e.b = append(e.b, '"')
		e.b = r.lastUpdated.UTC().AppendFormat(e.b, "2006-01-02T15:04:05.000Z")
		e.b = append(e.b, '"')
	}
	if e.field("valueQuantity") {
		e.raw(`{"value":`)
		e.b = appendTenths(e.b, r.value)
		e.raw(`,"unit":`)
		e.str(o.unit)
		e.raw(`,"system":`)
		e.str(sysUCUM)
		e.raw(`,"code":`)
		e.str(o.ucum)
		e.raw("}")
	}
}

func (e *encoder) medicationRequest(r *rec) {
	if e.field("status") {
		e.str(r.status)
	}
	if e.field("intent") {
		e.str("order")
	}
	if e.field("medicationCodeableConcept") {
		e.b = appendConcept(e.b, r.code, true)
	}
	e.subject(r)
	e.encounterRef(r)
	if e.field("authoredOn") {
		e.instant(r.start)
	}
	if e.field("requester") {
		e.ref("Practitioner/pr-", r.practitioner)
	}
	if e.field("dosageInstruction") {
		e.raw(`[{"text":`)
		e.str(dosages[r.dosage])
		e.raw("}]")
	}
}

func (e *encoder) practitioner(r *rec) {
	if e.field("identifier") {
		e.raw(`[{"system":`)
		e.str(sysNPI)
		e.raw(`,"value":"`)
		e.b = strconv.AppendInt(e.b, int64(9_000_000_000+r.idx), 10)
		e.raw(`"}]`)
	}
	if e.field("active") {
		e.raw("true")
	}
	if e.field("name") {
		e.raw(`[{"family":`)
		e.str(familyNames[r.family])
		e.raw(`,"given":[`)
		e.str(e.givenName(r))
		e.raw(`],"prefix":["Dr."]}]`)
	}
	if e.field("gender") {
		e.str(genders[r.gender])
	}
}

func (e *encoder) organization(r *rec) {
	if e.field("identifier") {
		e.raw(`[{"system":`)
		e.str(sysOrgID)
		e.raw(`,"value":"ORG-`)
		e.b = strconv.AppendInt(e.b, int64(r.idx), 10)
		e.raw(`"}]`)
	}
	if e.field("active") {
		e.raw("true")
	}
	if e.field("type") {
		e.raw("[")
		e.b = appendConcept(e.b, &orgTypeProvider, false)
		e.raw("]")
	}
	if e.field("name") {
		e.str(cities[r.city] + " " + orgKinds[r.orgKind] + " " + strconv.Itoa(r.idx))
	}
	if e.field("address") {
		e.raw(`[{"city":`)
		e.str(cities[r.city])
		e.raw(`}]`)
	}
}
