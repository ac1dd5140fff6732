package bulkexport

import (
	"fmt"
	"net/http"
	"net/url"
	"strings"
)

// Route is one method and path the Handler serves.
type Route struct {
	// Method is GET, POST or DELETE. A GET route serves HEAD too.
	Method string
	// Path is the full request path: the BaseURL's path followed by
	// Endpoint, such as /fhir/Patient/$export. A name in braces ({id},
	// {job}, {file}) is a wildcard for one path segment, as in
	// http.ServeMux and chi patterns.
	Path string
	// Endpoint is Path below the BaseURL's path, such as
	// /Patient/$export, for routers mounted at the base (a chi
	// sub-router, for instance).
	Endpoint string
}

// Pattern is the route as an http.ServeMux pattern, such as
// "GET /fhir/Patient/$export".
func (r Route) Pattern() string { return r.Method + " " + r.Path }

// endpoints are the protocol's endpoints and the methods each answers.
var endpoints = []struct {
	path    string
	methods []string
}{
	{pathExport, []string{http.MethodGet, http.MethodPost}},
	{pathPatient, []string{http.MethodGet, http.MethodPost}},
	{groupPrefix + "{id}" + groupSuffix, []string{http.MethodGet, http.MethodPost}},
	{pathPoll, []string{http.MethodGet, http.MethodPost, http.MethodDelete}},
	{pollPathPrefix + "{id}", []string{http.MethodGet, http.MethodPost, http.MethodDelete}},
	{pathFiles + "{job}/{file}", []string{http.MethodGet}},
}

// Routes lists every method and path the Handler serves, under its
// BaseURL's path. A host that serves its own FHIR API under the same base
// registers these, method by method, rather than a catch-all prefix:
// with "GET /fhir/Patient/{id}" on an http.ServeMux, a catch-all
// "/fhir/" would lose GET /fhir/Patient/$export to the host's read, and
// an unqualified "/fhir/Patient/$export" conflicts with it (the mux
// panics). Method-qualified routes are more specific than the host's
// wildcard ones, so both coexist. Register does it for an http.ServeMux.
//
// Requests with other methods on these paths get a 405 from the router,
// not from the Handler; a Handler mounted on a catch-all prefix answers
// them itself with an OperationOutcome.
func (h *Handler) Routes() []Route {
	var routes []Route
	for _, e := range endpoints {
		for _, m := range e.methods {
			routes = append(routes, Route{Method: m, Path: h.basePattern + e.path, Endpoint: e.path})
		}
	}
	return routes
}

// Register registers the Handler on mux under every route of Routes. It
// fails when the BaseURL's path cannot be written as a pattern (it holds
// '{' or '}'), and, naming the route, when a route conflicts with one
// already on mux (where mux.Handle would panic); the routes before that
// one stay registered.
func (h *Handler) Register(mux *http.ServeMux) (err error) {
	if strings.ContainsAny(h.basePattern, "{}") {
		return fmt.Errorf("bulkexport: Register: the base path %q cannot be a ServeMux pattern", h.basePattern)
	}
	for _, r := range h.Routes() {
		if err := handleSafely(mux, r.Pattern(), h); err != nil {
			return err
		}
	}
	return nil
}

// handleSafely is mux.Handle, with its panic on a conflicting pattern
// turned into an error.
func handleSafely(mux *http.ServeMux, pattern string, h http.Handler) (err error) {
	defer func() {
		if p := recover(); p != nil {
			err = fmt.Errorf("bulkexport: Register %q: %v", pattern, p)
		}
	}()
	mux.Handle(pattern, h)
	return nil
}

// patternPath is the unescaped path of a base URL, without a trailing
// slash, as ServeMux patterns are written.
func patternPath(u *url.URL) string {
	return strings.TrimSuffix(u.Path, "/")
}
