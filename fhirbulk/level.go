package fhirbulk

// Level is the scope of an export: the whole system, every patient, or
// the members of one Group.
type Level string

const (
	// LevelSystem is [base]/$export: every resource the client may see.
	LevelSystem Level = "system"
	// LevelPatient is [base]/Patient/$export: the Patient compartment of
	// every patient.
	LevelPatient Level = "patient"
	// LevelGroup is [base]/Group/{id}/$export: the Patient compartment of the
	// Group's members.
	LevelGroup Level = "group"
)

// Valid reports whether l is one of the three defined levels.
func (l Level) Valid() bool {
	return l == LevelSystem || l == LevelPatient || l == LevelGroup
}
