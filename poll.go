package bulkexport

import (
	"encoding/json"
	"errors"
	"github.com/bulkfhir/bulkexport/fhirbulk"
	"log/slog"
	"net/http"
	"net/url"
	"strconv"
	"strings"
)

// serveStatus answers the status URL: [base]/$export-poll-status?_jobId=ID
// (GET, POST with a Parameters body, DELETE) and [base]/$export-poll-status/ID.
// pathID is the id from the path form, or "".
func (h *Handler) serveStatus(w http.ResponseWriter, r *http.Request, pathID string) {
	switch r.Method {
	case http.MethodGet, http.MethodHead, http.MethodPost, http.MethodDelete:
	default:
		w.Header().Set("Allow", "GET, HEAD, POST, DELETE")
		h.writeError(w, r, methodNotAllowed("GET, POST or DELETE"))
		return
	}
	w = h.tel.startPoll(w, r) // counts polls by status code
	defer h.tel.endPoll(w, r)
	clientID, err := h.authenticate(r)
	if err != nil {
		h.writeError(w, r, err)
		return
	}
	id, page, err := h.jobIDOf(r, pathID)
	if err != nil {
		h.writeError(w, r, err)
		return
	}
	job, err := h.lookupCached(r, clientID, id)
	if err != nil {
		h.writeError(w, r, err)
		return
	}
	if r.Method == http.MethodDelete {
		if h.finished != nil {
			// Before and after: a poll racing the delete may have cached
			// the job again in between.
			h.finished.drop(job.ID)
			defer h.finished.drop(job.ID)
		}
		h.cancel(w, r, job)
		return
	}
	if h.polls != nil && !job.State.Terminal() {
		now := h.now()
		if ok, wait := h.polls.allow(clientID+"\x00"+job.ID, now, h.opts.RetryAfter(job, now)); !ok {
			h.writeError(w, r, &tooManyRequests{retry: wait, msg: "polling much faster than the advised Retry-After; slow down"})
			return
		}
	}
	h.writeStatus(w, r, job, page)
}

// jobIDOf finds the job id of a status request, from the path, the _jobId
// query parameter, or (POST) a Parameters body, and the manifest page
// (_page, default 1).
func (h *Handler) jobIDOf(r *http.Request, pathID string) (string, int, error) {
	qid, page, err := parseStatusQuery(r.URL.RawQuery)
	if err != nil {
		return "", 0, err
	}
	id := pathID
	if id == "" {
		id = qid
	} else if qid != "" {
		return "", 0, paramError("_jobId", fhirbulk.IssueInvalid, "the job id is already in the path")
	}
	if id == "" && r.Method == http.MethodPost {
		body, err := readBody(r, h.opts.MaxBodyBytes)
		if err != nil {
			return "", 0, err
		}
		params, err := parseParametersBody(body)
		if err != nil {
			return "", 0, err
		}
		for _, p := range params {
			if err := checkBytes(p.name, p.value); err != nil {
				return "", 0, err
			}
			switch {
			case p.name != "_jobId":
				return "", 0, paramError(p.name, fhirbulk.IssueNotSupported, "unknown parameter; $export-poll-status takes only _jobId")
			case id != "":
				return "", 0, paramError("_jobId", fhirbulk.IssueInvalid, "may appear only once")
			}
			id = p.value
		}
	}
	if id == "" {
		return "", 0, &Error{Status: http.StatusBadRequest, Code: fhirbulk.IssueRequired, Param: "_jobId", Message: "the job id is required"}
	}
	if !validJobID(id) {
		// A valid id is plain ASCII, so only an invalid one needs the
		// byte check (bad bytes are bad input, 400).
		if badBytes(id) {
			return "", 0, &Error{Status: http.StatusBadRequest, Code: fhirbulk.IssueInvalid, Param: "_jobId",
				Message: "the job id must be valid UTF-8 without NUL characters"}
		}
		// No store could hold it: answer like an unknown job.
		return "", 0, &Error{Status: http.StatusNotFound, Code: fhirbulk.IssueNotFound, Param: "_jobId", Message: "no such export job"}
	}
	return id, page, nil
}

// parseStatusQuery extracts _jobId and _page from a raw query without
// building a map (this is the poll's hot path). Other parameters are
// refused, so that a typo such as _jobid is not silently read as
// "missing".
func parseStatusQuery(raw string) (id string, page int, err error) {
	page = 1
	seenID, seenPage := false, false
	for raw != "" {
		var kv string
		kv, raw, _ = strings.Cut(raw, "&")
		if kv == "" {
			continue
		}
		k, v, _ := strings.Cut(kv, "=")
		if strings.ContainsAny(k, "%+") {
			if k, err = url.QueryUnescape(k); err != nil {
				return "", 0, &Error{Status: http.StatusBadRequest, Code: fhirbulk.IssueInvalid, Message: "malformed query string"}
			}
		}
		if strings.ContainsAny(v, "%+") {
			if v, err = url.QueryUnescape(v); err != nil {
				return "", 0, paramError(k, fhirbulk.IssueInvalid, "malformed value")
			}
		}
		if err := checkBytes(k, v); err != nil {
			return "", 0, err
		}
		switch k {
		case "_jobId":
			if seenID {
				return "", 0, paramError("_jobId", fhirbulk.IssueInvalid, "may appear only once")
			}
			seenID, id = true, v
		case "_page":
			n, perr := strconv.Atoi(v)
			if seenPage || perr != nil || n < 1 || n > 1_000_000 {
				return "", 0, paramError("_page", fhirbulk.IssueInvalid, "must be a page number from 1, given once")
			}
			seenPage, page = true, n
		case "_format":
			// FHIR's general parameter; the answers are JSON either way.
		default:
			return "", 0, paramError(k, fhirbulk.IssueNotSupported, "unknown parameter; $export-poll-status takes only _jobId")
		}
	}
	return id, page, nil
}

// lookupCached is lookup through the finished-job cache, when there is
// one: a DELETE always reads the store.
func (h *Handler) lookupCached(r *http.Request, clientID, id string) (*Job, error) {
	if h.finished == nil || r.Method == http.MethodDelete {
		return h.lookup(r, clientID, id)
	}
	if job := h.finished.get(id, clientID, h.now()); job != nil {
		return job, nil
	}
	gen := h.finished.generation()
	job, err := h.lookup(r, clientID, id)
	if err != nil {
		return nil, err
	}
	return h.finished.put(job, h.now(), gen), nil
}

// lookup loads a job for a client. A job owned by another client, expired,
// or missing answers 404 with the same outcome, so that its existence does
// not leak.
func (h *Handler) lookup(r *http.Request, clientID, id string) (*Job, error) {
	job, err := h.store.Get(r.Context(), id)
	if err != nil || job.Owner != clientID {
		if err == nil || errors.Is(err, ErrNotFound) {
			return nil, &Error{Status: http.StatusNotFound, Code: fhirbulk.IssueNotFound, Message: "no such export job"}
		}
		return nil, storeError(err)
	}
	if job.State.Terminal() && !job.ExpiresAt.IsZero() && !h.now().Before(job.ExpiresAt) {
		return nil, &Error{Status: http.StatusNotFound, Code: fhirbulk.IssueNotFound, Message: "the export job has expired and its files were removed"}
	}
	return job, nil
}

// writeStatus answers a poll for a job the client may see.
func (h *Handler) writeStatus(w http.ResponseWriter, r *http.Request, job *Job, page int) {
	hdr := w.Header()
	// Under Prefer: separate-export-status the HTTP status describes the
	// poll (200) and X-Export-Status the job.
	separate := job.Request.SeparateExportStatus
	answer := func(status int) int {
		if !separate {
			return status
		}
		hdr.Set("X-Export-Status", strconv.Itoa(status)+" "+http.StatusText(status))
		return http.StatusOK
	}
	switch job.State {
	case StateQueued, StateRunning:
		hdr.Set("X-Progress", progressText(job))
		// Integer seconds, at least 1: clients read the header with an
		// integer parse, and 0 would invite a busy loop.
		hdr.Set("Retry-After", retryAfterSeconds(h.opts.RetryAfter(job, h.now())))
		if job.Request.AllowPartialManifests {
			// A page whose files are all final may be served already.
			body, ok, err := h.manifestFor(w, r, job, page)
			if err != nil {
				h.writeError(w, r, err)
				return
			}
			if ok {
				writeJSON(w, answer(http.StatusAccepted), contentTypeJSON, body)
				return
			}
		}
		w.WriteHeader(answer(http.StatusAccepted))
	case StateCompleted:
		b, err := h.completedManifest(w, r, job, page)
		if err != nil {
			h.writeError(w, r, err)
			return
		}
		if !job.ExpiresAt.IsZero() {
			hdr.Set("Expires", job.ExpiresAt.UTC().Format(http.TimeFormat))
		}
		writeBody(w, answer(http.StatusOK), contentTypeJSON, b)
	case StateFailed:
		// processing, not exception: exception is in the transient branch,
		// which would tell the client to retry a job that is dead.
		status, oo := http.StatusInternalServerError, fhirbulk.NewOutcome(fhirbulk.SeverityFatal, fhirbulk.IssueProcessing, "the export failed")
		if job.Failure != nil {
			if job.Failure.Status >= 400 && job.Failure.Status <= 599 {
				status = job.Failure.Status
			}
			if job.Failure.Outcome != nil {
				oo = job.Failure.Outcome
			}
		}
		writeJSON(w, answer(status), contentTypeFHIRJSON, oo)
	case StateCancelled:
		h.writeError(w, r, &Error{Status: http.StatusNotFound, Code: fhirbulk.IssueDeleted, Message: "the export job was cancelled"})
	default:
		h.writeError(w, r, errors.New("bulkexport: job in unknown state "+string(job.State)))
	}
}

// completedManifest is page k of a completed job's manifest, encoded. With
// the finished-job cache, and URLs that are not signed per poll, it is
// encoded once and kept with the cached job.
func (h *Handler) completedManifest(w http.ResponseWriter, r *http.Request, job *Job, k int) ([]byte, error) {
	cacheable := h.finished != nil && !h.signsManifest()
	if cacheable {
		if b := h.finished.page(job, k); b != nil {
			return b, nil
		}
	}
	body, ok, err := h.manifestFor(w, r, job, k)
	if err != nil {
		return nil, err
	}
	if !ok {
		return nil, &Error{Status: http.StatusNotFound, Code: fhirbulk.IssueNotFound, Param: "_page", Message: "the manifest has no such page"}
	}
	b, err := json.Marshal(body)
	if err != nil {
		return nil, err
	}
	if cacheable {
		h.finished.setPage(job, k, b)
	}
	return b, nil
}

// progressText is the X-Progress value: under 100 characters, printable
// ASCII, with a percentage when one is known ("42% complete: Observation").
func progressText(job *Job) string {
	var b strings.Builder
	switch {
	case job.State == StateQueued:
		b.WriteString("queued")
	case job.Progress.Percent >= 0:
		b.WriteString(strconv.Itoa(int(min(job.Progress.Percent, 100))))
		b.WriteString("% complete")
	default:
		b.WriteString("in progress")
	}
	if m := job.Progress.Message; m != "" && m != "queued" {
		b.WriteString(": ")
		for i := 0; i < len(m) && b.Len() < 99; i++ {
			if c := m[i]; c >= 0x20 && c < 0x7f {
				b.WriteByte(c)
			}
		}
	}
	return b.String()
}

// cancel answers DELETE on the status URL.
func (h *Handler) cancel(w http.ResponseWriter, r *http.Request, job *Job) {
	ctx := r.Context()
	for attempt := 0; ; attempt++ {
		switch job.State {
		case StateQueued, StateRunning:
			now := h.now()
			job.State = StateCancelled
			job.Progress.Message = "cancelled"
			job.CompletedAt = now
			job.UpdatedAt = now
			job.ExpiresAt = now.Add(h.opts.CancelledRetention)
			err := h.store.Update(ctx, job)
			if errors.Is(err, ErrConflict) && attempt < 10 {
				// A worker moved the job on (progress, or it finished);
				// look again and decide on the fresh state.
				if job, err = h.store.Get(ctx, job.ID); err == nil {
					continue
				}
			}
			if err != nil {
				h.writeError(w, r, storeError(err))
				return
			}
			h.log.LogAttrs(ctx, slog.LevelInfo, "bulkexport: job cancelled", jobAttrs(job)...)
			h.tel.transition(ctx, StateCancelled, job.Level)
			writeJSON(w, http.StatusAccepted, contentTypeFHIRJSON,
				fhirbulk.NewOutcome(fhirbulk.SeverityInformation, fhirbulk.IssueInformational, "export job "+job.ID+" cancelled"))
			return
		case StateCompleted, StateFailed:
			if h.opts.DeletePolicy != DeleteFinishedRemoves {
				h.writeError(w, r, &Error{Status: http.StatusNotFound, Code: fhirbulk.IssueNotFound,
					Message: "the export job has already " + string(job.State) + " and cannot be cancelled"})
				return
			}
			if err := h.remove(r, job); err != nil {
				h.writeError(w, r, err)
				return
			}
			writeJSON(w, http.StatusAccepted, contentTypeFHIRJSON,
				fhirbulk.NewOutcome(fhirbulk.SeverityInformation, fhirbulk.IssueInformational, "export job "+job.ID+" and its files deleted"))
			return
		default: // cancelled
			h.writeError(w, r, &Error{Status: http.StatusNotFound, Code: fhirbulk.IssueDeleted, Message: "the export job was already cancelled"})
			return
		}
	}
}

// remove deletes a finished job's files, then the job.
func (h *Handler) remove(r *http.Request, job *Job) error {
	ctx := r.Context()
	if h.opts.Storage != nil {
		if err := h.opts.Storage.Delete(ctx, job.ID); err != nil {
			return &Error{Status: http.StatusServiceUnavailable, Code: fhirbulk.IssueTransient, Message: "the files could not be removed; retry later", Err: err}
		}
	}
	if err := h.store.Delete(ctx, job.ID); err != nil && !errors.Is(err, ErrNotFound) {
		return storeError(err)
	}
	h.log.LogAttrs(ctx, slog.LevelInfo, "bulkexport: job deleted", jobAttrs(job)...)
	return nil
}
