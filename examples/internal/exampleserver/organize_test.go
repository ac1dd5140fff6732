package exampleserver

import (
	"bufio"
	"bytes"
	"encoding/json"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/bulkfhir/bulkexport"
	"github.com/bulkfhir/bulkexport/fhirbulk"
)

// TestOrganizeOutputByPatient exports with organizeOutputBy=Patient at the
// three levels, with files small enough that blocks span files, and reads
// the files back in manifest order: every block starts with a Parameters
// header naming its patient, every other line of the block is that patient
// or one of its resources, no patient has two blocks, and the resources of
// every type are exactly those a plain export of the same query lists.
func TestOrganizeOutputByPatient(t *testing.T) {
	t.Parallel()
	srv, _ := start(t, Config{Patients: 30, Worker: &bulkexport.WorkerOptions{
		PollInterval: 10 * time.Millisecond, Heartbeat: 20 * time.Millisecond, MaxFileResources: 5}})
	for _, tc := range []struct {
		name, path string
		level      fhirbulk.Level
		group      string
	}{
		{"system", "/$export", fhirbulk.LevelSystem, ""},
		{"patient", "/Patient/$export", fhirbulk.LevelPatient, ""},
		{"group", "/Group/cohort-3/$export", fhirbulk.LevelGroup, "cohort-3"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m, _ := exportAll(t, srv.BaseURL+tc.path+"?organizeOutputBy=Patient&_type=Patient,Observation,Condition", "")
			require.Equal(t, "Patient", m.OutputOrganizedBy)
			require.NotEmpty(t, m.Output)

			got := map[string][]string{} // type → ids, in file order
			seen := map[string]bool{}    // patients with a block
			block := ""
			spans := 0
			for i, f := range m.Output {
				require.Empty(t, f.Type, "organized output lists no type")
				resp, body := do(t, http.MethodGet, f.URL, "")
				require.Equal(t, http.StatusOK, resp.StatusCode)
				sc := bufio.NewScanner(bytes.NewReader(body))
				first := true
				for sc.Scan() {
					var r struct {
						ResourceType string `json:"resourceType"`
						ID           string `json:"id"`
						Parameter    []struct {
							Name           string `json:"name"`
							ValueReference struct {
								Reference string `json:"reference"`
							} `json:"valueReference"`
						} `json:"parameter"`
						Subject struct {
							Reference string `json:"reference"`
						} `json:"subject"`
					}
					require.NoError(t, json.Unmarshal(sc.Bytes(), &r), "%s", sc.Bytes())
					if r.ResourceType == "Parameters" {
						require.Len(t, r.Parameter, 1)
						require.Equal(t, "header", r.Parameter[0].Name)
						ref := r.Parameter[0].ValueReference.Reference
						if first && i > 0 && m.Output[i-1].ContinuesInFile != "" {
							// The block carried over from the previous file
							// repeats its header.
							require.Equal(t, block, ref)
							require.Equal(t, f.URL, m.Output[i-1].ContinuesInFile)
							spans++
						} else {
							require.False(t, seen[ref], "%s has two blocks", ref)
						}
						seen[ref] = true
						block = ref
						first = false
						continue
					}
					require.False(t, first, "file %d does not start with a block header", i)
					if r.ResourceType == "Patient" {
						require.Equal(t, block, "Patient/"+r.ID)
					} else {
						require.Equal(t, block, r.Subject.Reference, "%s/%s in the block of %s", r.ResourceType, r.ID, block)
					}
					got[r.ResourceType] = append(got[r.ResourceType], r.ID)
				}
				require.NoError(t, sc.Err())
			}
			require.Positive(t, spans, "no block spans two files; the test needs smaller files")

			q := &bulkexport.Query{Level: tc.level, GroupID: tc.group}
			for _, typ := range []string{"Patient", "Observation", "Condition"} {
				want, err := srv.Dataset.Expected(q, typ)
				require.NoError(t, err)
				require.Equal(t, want, got[typ], typ)
			}
			require.Len(t, got, 3, "only the requested types")
			for ref := range seen {
				idx, err := strconv.Atoi(strings.TrimPrefix(ref, "Patient/p-"))
				require.NoError(t, err)
				if tc.group != "" {
					require.True(t, srv.Dataset.IsMember(tc.group, idx), "%s is not in the group", ref)
				}
			}
		})
	}
}
