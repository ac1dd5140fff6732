package fhirbulk

import "encoding/json"

// ManifestTypeURL is the STU4 manifestType.
const ManifestTypeURL = "http://hl7.org/fhir/uv/bulkdata/StructureDefinition/BulkDataManifest"

// Manifest is the body of a completed status response. The handler writes
// it in the STU2/STU3 shape; the STU4 fields (Outcome, OutputFormat,
// ManifestType) are there so that clients can decode either shape.
type Manifest struct {
	// ManifestType is the STU4 profile URL.
	ManifestType string `json:"manifestType,omitempty"`
	// TransactionTime is the instant the export's data reflects.
	TransactionTime string `json:"transactionTime"`
	// Request is the full kick-off URL (not in STU4).
	Request string `json:"request"`
	// RequiresAccessToken says whether downloads need the kick-off's token.
	RequiresAccessToken bool `json:"requiresAccessToken"`
	// OutputFormat is the files' MIME type (STU4).
	OutputFormat string `json:"outputFormat,omitempty"`
	// OutputOrganizedBy echoes organizeOutputBy.
	OutputOrganizedBy string `json:"outputOrganizedBy,omitempty"`
	// Output lists the data files; always present, [] when empty.
	Output []ManifestFile `json:"output"`
	// Deleted lists NDJSON files of transaction Bundles with DELETE
	// entries; left out when there are none.
	Deleted []ManifestFile `json:"deleted,omitempty"`
	// Error lists NDJSON files of OperationOutcomes; always present.
	Error []ManifestFile `json:"error"`
	// Outcome is STU4's name for Error.
	Outcome []ManifestFile `json:"outcome,omitempty"`
	// Link points to the next page of a paged manifest.
	Link []ManifestLink `json:"link,omitempty"`
	// Extension is a JSON object of custom fields (an array of FHIR
	// Extensions in STU4).
	Extension json.RawMessage `json:"extension,omitempty"`
}

// ManifestFile is one entry of output[], deleted[] or error[].
type ManifestFile struct {
	// Type is the resource type of every line; absent for organized
	// output (and for deleted[] in STU4).
	Type string `json:"type,omitempty"`
	URL  string `json:"url"`
	// Count is the number of resources in the file.
	Count *int64 `json:"count,omitempty"`
	// ContinuesInFile is the URL of the file where this file's last
	// resource block continues (organized output).
	ContinuesInFile string `json:"continuesInFile,omitempty"`
	// FileSize is the size in bytes (STU4).
	FileSize *int64 `json:"fileSize,omitempty"`
}

// ManifestLink is one entry of a manifest's link[].
type ManifestLink struct {
	Relation string `json:"relation"`
	URL      string `json:"url"`
}
