package exampleserver

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"strconv"
	"strings"

	"github.com/bulkfhir/bulkexport"
	"github.com/bulkfhir/bulkexport/examples/internal/dataset"
	"github.com/bulkfhir/bulkexport/fhirbulk"
)

// maxGroupMembers is the most members a Group resource lists; a larger
// group gives its quantity only, so that a read of a group of a million
// patients stays small.
const maxGroupMembers = 10000

// hostReads is the host's own FHIR API beside the bulk data routes: the
// reads a bulk data client uses to find the groups it may export, GET
// [base]/Group (a searchset Bundle; name and _count are supported,
// _offset pages) and GET [base]/Group/{id}, and GET [base]/Patient/{id}.
// auth is the handler's Authenticate hook, nil without authentication.
type hostReads struct {
	ds   *dataset.Dataset
	base string
	auth func(*http.Request) (string, error)
}

type groupMember struct {
	Entity struct {
		Reference string `json:"reference"`
	} `json:"entity"`
}

type groupResource struct {
	ResourceType string        `json:"resourceType"`
	ID           string        `json:"id"`
	Type         string        `json:"type"`
	Actual       bool          `json:"actual"`
	Name         string        `json:"name"`
	Quantity     int           `json:"quantity"`
	Member       []groupMember `json:"member,omitempty"`
}

func (g *hostReads) group(id string) (*groupResource, error) {
	members, err := g.ds.GroupMembers(id)
	if err != nil {
		return nil, err
	}
	res := &groupResource{ResourceType: "Group", ID: id, Type: "person", Actual: true,
		Name: dataset.GroupName(id), Quantity: len(members)}
	if len(members) <= maxGroupMembers {
		res.Member = make([]groupMember, len(members))
		for i, idx := range members {
			res.Member[i].Entity.Reference = "Patient/p-" + strconv.Itoa(idx)
		}
	}
	return res, nil
}

// authorized answers 401 and reports false when the request is not let in.
func (g *hostReads) authorized(w http.ResponseWriter, r *http.Request) bool {
	if g.auth == nil {
		return true
	}
	if _, err := g.auth(r); err != nil {
		w.Header().Set("WWW-Authenticate", "Bearer")
		writeOutcome(w, http.StatusUnauthorized, fhirbulk.IssueLogin, "authentication required: send Authorization: Bearer TOKEN")
		return false
	}
	return true
}

// groupRead serves GET [base]/Group/{id}.
func (g *hostReads) groupRead(w http.ResponseWriter, r *http.Request) {
	if !g.authorized(w, r) {
		return
	}
	id := r.PathValue("id")
	res, err := g.group(id)
	if errors.Is(err, bulkexport.ErrNotFound) {
		writeOutcome(w, http.StatusNotFound, fhirbulk.IssueNotFound, fmt.Sprintf("Group/%s is not known", id))
		return
	}
	writeFHIR(w, res)
}

// groupSearch serves GET [base]/Group.
func (g *hostReads) groupSearch(w http.ResponseWriter, r *http.Request) {
	if !g.authorized(w, r) {
		return
	}
	q := r.URL.Query()
	count, err := nonNegative(q, "_count", 50)
	if err != nil {
		writeOutcome(w, http.StatusBadRequest, fhirbulk.IssueInvalid, err.Error())
		return
	}
	offset, err := nonNegative(q, "_offset", 0)
	if err != nil {
		writeOutcome(w, http.StatusBadRequest, fhirbulk.IssueInvalid, err.Error())
		return
	}
	// name: FHIR string search, a case-insensitive match at the start of
	// the name (any of a comma-separated list).
	var names []string
	for _, v := range q["name"] {
		for _, n := range strings.Split(v, ",") {
			names = append(names, strings.ToLower(n))
		}
	}
	var match []string
	for _, id := range dataset.Groups() {
		name := strings.ToLower(dataset.GroupName(id))
		ok := len(names) == 0
		for _, n := range names {
			ok = ok || strings.HasPrefix(name, n)
		}
		if ok {
			match = append(match, id)
		}
	}

	type entry struct {
		FullURL  string         `json:"fullUrl"`
		Resource *groupResource `json:"resource"`
		Search   struct {
			Mode string `json:"mode"`
		} `json:"search"`
	}
	type link struct {
		Relation string `json:"relation"`
		URL      string `json:"url"`
	}
	bundle := struct {
		ResourceType string  `json:"resourceType"`
		Type         string  `json:"type"`
		Total        int     `json:"total"`
		Link         []link  `json:"link"`
		Entry        []entry `json:"entry,omitempty"`
	}{ResourceType: "Bundle", Type: "searchset", Total: len(match)}
	page := func(off int) string {
		v := url.Values{}
		for _, n := range q["name"] {
			v.Add("name", n)
		}
		v.Set("_count", strconv.Itoa(count))
		v.Set("_offset", strconv.Itoa(off))
		return g.base + "/Group?" + v.Encode()
	}
	bundle.Link = append(bundle.Link, link{"self", page(offset)})
	end := min(offset+count, len(match))
	if count > 0 && end < len(match) {
		bundle.Link = append(bundle.Link, link{"next", page(end)})
	}
	for i := offset; i < end; i++ {
		res, err := g.group(match[i])
		if err != nil {
			writeOutcome(w, http.StatusInternalServerError, fhirbulk.IssueException, err.Error())
			return
		}
		e := entry{FullURL: g.base + "/Group/" + match[i], Resource: res}
		e.Search.Mode = "match"
		bundle.Entry = append(bundle.Entry, e)
	}
	writeFHIR(w, bundle)
}

// nonNegative parses the integer parameter name, def when absent.
func nonNegative(q url.Values, name string, def int) (int, error) {
	v := q.Get(name)
	if v == "" {
		return def, nil
	}
	n, err := strconv.Atoi(v)
	if err != nil || n < 0 {
		return 0, fmt.Errorf("%s must be a non-negative integer, not %q", name, v)
	}
	return n, nil
}

func writeFHIR(w http.ResponseWriter, v any) {
	b, err := json.Marshal(v)
	if err != nil {
		writeOutcome(w, http.StatusInternalServerError, fhirbulk.IssueException, err.Error())
		return
	}
	w.Header().Set("Content-Type", "application/fhir+json")
	_, _ = w.Write(b)
}

// patientRead serves GET [base]/Patient/{id}: a host's ordinary read, on
// the same mux as GET [base]/Patient/$export.
func (g *hostReads) patientRead(w http.ResponseWriter, r *http.Request) {
	if !g.authorized(w, r) {
		return
	}
	b, err := g.ds.Resource("Patient", r.PathValue("id"))
	if err != nil {
		writeOutcome(w, http.StatusNotFound, fhirbulk.IssueNotFound, "no Patient "+strconv.Quote(r.PathValue("id")))
		return
	}
	w.Header().Set("Content-Type", "application/fhir+json")
	_, _ = w.Write(b)
}
