package dataset

import "time"

// This file derives every resource from (seed, kind, owner index, sequence
// number) with a counter-based generator: nothing is stored, and the same
// inputs always give the same resource.

// kind is a resource type of the dataset.
type kind uint8

const (
	kindPatient kind = iota + 1
	kindEncounter
	kindCondition
	kindObservation
	kindMedicationRequest
	kindPractitioner
	kindOrganization
	// kindCounts is the stream that decides how many resources of each
	// compartment type a patient has.
	kindCounts
)

var kindNames = map[kind]string{
	kindPatient:           "Patient",
	kindEncounter:         "Encounter",
	kindCondition:         "Condition",
	kindObservation:       "Observation",
	kindMedicationRequest: "MedicationRequest",
	kindPractitioner:      "Practitioner",
	kindOrganization:      "Organization",
}

func (k kind) String() string { return kindNames[k] }

// kindOf maps a resource type name to its kind, or 0.
func kindOf(typ string) kind {
	for k, name := range kindNames {
		if name == typ {
			return k
		}
	}
	return 0
}

// idPrefix starts the ids of a kind: Patient p-12, Encounter e-12-1, ...
var idPrefix = map[kind]string{
	kindPatient:           "p-",
	kindEncounter:         "e-",
	kindCondition:         "c-",
	kindObservation:       "o-",
	kindMedicationRequest: "m-",
	kindPractitioner:      "pr-",
	kindOrganization:      "org-",
}

// mix is the splitmix64 finalizer: a bijective 64-bit hash.
func mix(x uint64) uint64 {
	x ^= x >> 30
	x *= 0xbf58476d1ce4e5b9
	x ^= x >> 27
	x *= 0x94d049bb133111eb
	x ^= x >> 31
	return x
}

// rng is a splitmix64 stream. It is a value: it costs nothing to create.
type rng struct{ s uint64 }

func newRNG(seed uint64, k kind, idx, seq int) rng {
	s := mix(seed + uint64(k)*0x9e3779b97f4a7c15)
	s = mix(s ^ uint64(idx))
	s = mix(s ^ uint64(seq)<<1 ^ 1)
	return rng{s: s}
}

func (r *rng) next() uint64 {
	r.s += 0x9e3779b97f4a7c15
	return mix(r.s)
}

// intn returns an int in [0, n).
func (r *rng) intn(n int) int { return int(r.next() % uint64(n)) }

// between returns an int in [lo, hi].
func (r *rng) between(lo, hi int) int { return lo + r.intn(hi-lo+1) }

// pick chooses an index of weights with probability proportional to it.
func (r *rng) pick(weights []int) int {
	total := 0
	for _, w := range weights {
		total += w
	}
	x := r.intn(total)
	for i, w := range weights {
		if x < w {
			return i
		}
		x -= w
	}
	return len(weights) - 1
}

// Reference is the fixed instant the dataset is dated against: every
// meta.lastUpdated lies in the two years before it, whatever the clock says.
var Reference = time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)

// span is the period before Reference over which lastUpdated is spread.
const span = 2 * 365 * 24 * time.Hour

// lastUpdated draws an instant (whole seconds) in (Reference-span, Reference).
func (r *rng) lastUpdated() time.Time {
	secs := int64(span / time.Second)
	return Reference.Add(-time.Duration(1+r.intn(int(secs-1))) * time.Second)
}

// coding is a FHIR Coding.
type coding struct{ system, code, display string }

const (
	sysLOINC     = "http://loinc.org"
	sysSNOMED    = "http://snomed.info/sct"
	sysRxNorm    = "http://www.nlm.nih.gov/research/umls/rxnorm"
	sysUCUM      = "http://unitsofmeasure.org"
	sysActCode   = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
	sysClinical  = "http://terminology.hl7.org/CodeSystem/condition-clinical"
	sysVerif     = "http://terminology.hl7.org/CodeSystem/condition-ver-status"
	sysCondCat   = "http://terminology.hl7.org/CodeSystem/condition-category"
	sysObsCat    = "http://terminology.hl7.org/CodeSystem/observation-category"
	sysOrgType   = "http://terminology.hl7.org/CodeSystem/organization-type"
	sysGender    = "http://hl7.org/fhir/administrative-gender"
	sysEncStatus = "http://hl7.org/fhir/encounter-status"
	sysObsStatus = "http://hl7.org/fhir/observation-status"
	sysMedStatus = "http://hl7.org/fhir/CodeSystem/medicationrequest-status"
	sysMedIntent = "http://hl7.org/fhir/CodeSystem/medicationrequest-intent"
	sysMRN       = "https://bulkfhir.example/fhir/sid/mrn"
	sysNPI       = "http://hl7.org/fhir/sid/us-npi"
	sysOrgID     = "https://bulkfhir.example/fhir/sid/organization"
)

// obsKind is an Observation code with its unit and value range (in tenths).
type obsKind struct {
	code     coding
	category coding
	unit     string // human unit
	ucum     string // UCUM code
	lo, hi   int    // value range in tenths
	decimals bool   // whether the value has a decimal place
}

var (
	catVital = coding{sysObsCat, "vital-signs", "Vital Signs"}
	catLab   = coding{sysObsCat, "laboratory", "Laboratory"}
)

var observationKinds = []obsKind{
	{code: coding{sysLOINC, "8867-4", "Heart rate"}, category: catVital, unit: "beats/minute", ucum: "/min", lo: 500, hi: 1200},
	{code: coding{sysLOINC, "8480-6", "Systolic blood pressure"}, category: catVital, unit: "mmHg", ucum: "mm[Hg]", lo: 950, hi: 1700},
	{code: coding{sysLOINC, "8462-4", "Diastolic blood pressure"}, category: catVital, unit: "mmHg", ucum: "mm[Hg]", lo: 550, hi: 1050},
	{code: coding{sysLOINC, "29463-7", "Body weight"}, category: catVital, unit: "kg", ucum: "kg", lo: 450, hi: 1300, decimals: true},
	{code: coding{sysLOINC, "8302-2", "Body height"}, category: catVital, unit: "cm", ucum: "cm", lo: 1500, hi: 2000, decimals: true},
	{code: coding{sysLOINC, "8310-5", "Body temperature"}, category: catVital, unit: "Cel", ucum: "Cel", lo: 361, hi: 389, decimals: true},
	{code: coding{sysLOINC, "9279-1", "Respiratory rate"}, category: catVital, unit: "breaths/minute", ucum: "/min", lo: 120, hi: 220},
	{code: coding{sysLOINC, "2339-0", "Glucose [Mass/volume] in Blood"}, category: catLab, unit: "mg/dL", ucum: "mg/dL", lo: 700, hi: 1800},
}

var observationStatuses = []string{"final", "amended", "preliminary"}
var observationStatusWeights = []int{90, 7, 3}

var conditionCodes = []coding{
	{sysSNOMED, "38341003", "Hypertensive disorder"},
	{sysSNOMED, "44054006", "Diabetes mellitus type 2"},
	{sysSNOMED, "195967001", "Asthma"},
	{sysSNOMED, "13645005", "Chronic obstructive lung disease"},
	{sysSNOMED, "35489007", "Depressive disorder"},
	{sysSNOMED, "55822004", "Hyperlipidemia"},
	{sysSNOMED, "444814009", "Viral sinusitis"},
	{sysSNOMED, "10509002", "Acute bronchitis"},
	{sysSNOMED, "233604007", "Pneumonia"},
	{sysSNOMED, "68496003", "Polyp of colon"},
}

var clinicalStatuses = []string{"active", "resolved"}

var medicationCodes = []coding{
	{sysRxNorm, "314076", "lisinopril 10 MG Oral Tablet"},
	{sysRxNorm, "860975", "24 HR metformin hydrochloride 500 MG Extended Release Oral Tablet"},
	{sysRxNorm, "197361", "amlodipine 5 MG Oral Tablet"},
	{sysRxNorm, "310798", "hydrochlorothiazide 25 MG Oral Tablet"},
	{sysRxNorm, "259255", "atorvastatin 80 MG Oral Tablet"},
	{sysRxNorm, "313782", "acetaminophen 325 MG Oral Tablet"},
	{sysRxNorm, "308182", "amoxicillin 250 MG Oral Capsule"},
	{sysRxNorm, "895994", "fluticasone propionate 0.044 MG/ACTUAL Metered Dose Inhaler"},
}

var dosages = []string{"1 tablet daily", "1 tablet twice daily", "2 tablets as needed, at most 8 a day", "2 puffs twice daily"}

var medicationStatuses = []string{"active", "completed", "stopped"}
var medicationStatusWeights = []int{50, 40, 10}

var encounterClasses = []coding{
	{sysActCode, "AMB", "ambulatory"},
	{sysActCode, "IMP", "inpatient encounter"},
	{sysActCode, "EMER", "emergency"},
}
var encounterClassWeights = []int{80, 12, 8}

var encounterTypes = []coding{
	{sysSNOMED, "185349003", "Encounter for check up"},
	{sysSNOMED, "185345009", "Encounter for symptom"},
	{sysSNOMED, "390906007", "Follow-up encounter"},
	{sysSNOMED, "50849002", "Emergency room admission"},
}

var encounterStatuses = []string{"finished", "in-progress", "cancelled"}
var encounterStatusWeights = []int{85, 10, 5}

var genders = []string{"female", "male", "other", "unknown"}
var genderWeights = []int{49, 49, 1, 1}

var familyNames = []string{"Jensen", "Nielsen", "Hansen", "Pedersen", "Andersen", "Christensen", "Larsen", "Sørensen",
	"Smith", "Johnson", "Williams", "Brown", "Garcia", "Miller", "Davis", "Martinez", "Nguyen", "Kowalski"}
var femaleNames = []string{"Anna", "Emma", "Ida", "Sofia", "Maria", "Olivia", "Grace", "Mette", "Karen", "Lucia", "Amira", "Hannah"}
var maleNames = []string{"Lars", "Jens", "Peter", "Mikkel", "Noah", "William", "James", "Oliver", "Mohammed", "Lucas", "Carl", "Emil"}

var cities = []string{"Copenhagen", "Aarhus", "Odense", "Aalborg", "Esbjerg", "Boston", "Springfield", "Portland"}
var orgKinds = []string{"Clinic", "Hospital", "Health Centre", "Medical Practice"}

// rec is one generated resource: the fields that select it (status, codes,
// lastUpdated) and the fields that only fill its JSON. One struct serves
// every kind; a kind uses the fields its encoder reads.
type rec struct {
	kind        kind
	idx         int // patient index, or practitioner/organization index
	seq         int // 1-based number within the patient; 0 for the others
	lastUpdated time.Time

	// Patient, Practitioner, Organization
	gender        int
	given, family int
	birth         time.Time
	city          int
	org, gp       int // managingOrganization or serviceProvider; generalPractitioner
	mrn           int
	orgKind       int

	// Encounter, Condition, Observation, MedicationRequest
	practitioner int     // Encounter participant, MedicationRequest requester
	encounter    int     // 1-based encounter number within the patient
	status       string  // Encounter, Observation, MedicationRequest status
	code         *coding // Condition, Observation, MedicationRequest code
	obs          *obsKind
	value        int // Observation value in tenths
	class        int
	encType      int
	clinical     string    // Condition clinicalStatus
	start, end   time.Time // Encounter period; Condition onset/abatement; effective; authoredOn
	dosage       int
}

// counts is how many resources of each compartment type a patient has.
type counts struct{ encounters, conditions, observations, medications int }

func (d *Dataset) counts(idx int) counts {
	r := newRNG(d.seed, kindCounts, idx, 0)
	return counts{
		encounters:   r.between(1, 3),
		conditions:   r.between(1, 3),
		observations: r.between(1, 3),
		medications:  r.between(1, 3),
	}
}

// perPatient is how many resources of kind k patient idx has.
func (d *Dataset) perPatient(k kind, idx int) int {
	c := d.counts(idx)
	switch k {
	case kindPatient:
		return 1
	case kindEncounter:
		return c.encounters
	case kindCondition:
		return c.conditions
	case kindObservation:
		return c.observations
	case kindMedicationRequest:
		return c.medications
	}
	return 0
}

// gen fills *out with resource seq of kind k for owner idx.
func (d *Dataset) gen(k kind, idx, seq int, out *rec) {
	r := newRNG(d.seed, k, idx, seq)
	*out = rec{kind: k, idx: idx, seq: seq, lastUpdated: r.lastUpdated()}
	switch k {
	case kindPatient:
		out.gender = r.pick(genderWeights)
		out.family = r.intn(len(familyNames))
		out.given = r.intn(len(femaleNames))
		out.birth = time.Date(1930, 1, 1, 0, 0, 0, 0, time.UTC).AddDate(0, 0, r.intn(85*365))
		out.city = r.intn(len(cities))
		out.org = 1 + r.intn(d.organizations)
		out.gp = 1 + r.intn(d.practitioners)
		out.mrn = idx
	case kindPractitioner:
		out.gender = r.intn(2)
		out.family = r.intn(len(familyNames))
		out.given = r.intn(len(femaleNames))
		out.org = 1 + r.intn(d.organizations)
	case kindOrganization:
		out.city = r.intn(len(cities))
		out.orgKind = r.intn(len(orgKinds))
	case kindEncounter:
		out.status = encounterStatuses[r.pick(encounterStatusWeights)]
		out.class = r.pick(encounterClassWeights)
		out.encType = r.intn(len(encounterTypes))
		if out.class == 2 {
			out.encType = 3
		}
		out.practitioner = 1 + r.intn(d.practitioners)
		out.org = 1 + r.intn(d.organizations)
		// The visit took place up to 30 days before the record's last update.
		out.start = out.lastUpdated.Add(-time.Duration(r.intn(30*24*3600)) * time.Second)
		hours := 1
		if out.class == 1 {
			hours = r.between(24, 24*7)
		}
		out.end = out.start.Add(time.Duration(hours) * time.Hour)
	case kindCondition:
		out.code = &conditionCodes[r.intn(len(conditionCodes))]
		out.clinical = clinicalStatuses[r.intn(len(clinicalStatuses))]
		out.encounter = 1 + r.intn(d.perPatient(kindEncounter, idx))
		out.start = out.lastUpdated.Add(-time.Duration(r.intn(365*24*3600)) * time.Second)
		out.end = out.start.Add(time.Duration(r.between(7, 60)) * 24 * time.Hour)
		if out.end.After(out.lastUpdated) {
			out.end = out.lastUpdated
		}
	case kindObservation:
		o := &observationKinds[r.intn(len(observationKinds))]
		out.obs = o
		out.code = &o.code
		out.status = observationStatuses[r.pick(observationStatusWeights)]
		out.value = r.between(o.lo, o.hi)
		if !o.decimals {
			out.value -= out.value % 10
		}
		out.encounter = 1 + r.intn(d.perPatient(kindEncounter, idx))
		out.start = out.lastUpdated.Add(-time.Duration(r.intn(7*24*3600)) * time.Second)
	case kindMedicationRequest:
		out.code = &medicationCodes[r.intn(len(medicationCodes))]
		out.status = medicationStatuses[r.pick(medicationStatusWeights)]
		out.encounter = 1 + r.intn(d.perPatient(kindEncounter, idx))
		out.practitioner = 1 + r.intn(d.practitioners)
		out.dosage = r.intn(len(dosages))
		out.start = out.lastUpdated.Add(-time.Duration(r.intn(14*24*3600)) * time.Second)
	}
}
