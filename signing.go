package bulkexport

import (
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"errors"
	"github.com/bulkfhir/bulkexport/fhirbulk"
	"net/http"
	"net/url"
	"strconv"
	"time"
)

// SigningKey is a secret for signed file URLs (Options.SigningKeys). ID
// names the key in the URLs it signs, so that keys can be rotated: sign
// with a new key while the old one still verifies the URLs already handed
// out, then drop it once they have expired.
type SigningKey struct {
	// ID is a short name, [A-Za-z0-9_-], unique among the keys.
	ID string
	// Secret is at least 32 random bytes.
	Secret []byte
}

// Query parameters of a signed file URL.
const (
	sigParamExpires = "exp"
	sigParamKey     = "kid"
	sigParamSig     = "sig"
)

// hmacSigner signs the handler's own file URLs: [base]/bulkfiles/{job}/{file}
// ?exp={unix seconds}&kid={key id}&sig={HMAC-SHA256 of job, file and exp}.
// Such a URL works without a token until it expires, for that one file.
type hmacSigner struct{ h *Handler }

var _ URLSigner = hmacSigner{}

// SignedURL implements URLSigner with the first of Options.SigningKeys.
func (s hmacSigner) SignedURL(ctx context.Context, jobID, name string, expiry time.Duration) (string, error) {
	key := s.h.opts.SigningKeys[0]
	exp := strconv.FormatInt(s.h.now().Add(expiry).Unix(), 10)
	return s.h.FileURL(jobID, name) + "?" + sigParamExpires + "=" + exp + "&" + sigParamKey + "=" + key.ID +
		"&" + sigParamSig + "=" + fileSignature(key.Secret, jobID, name, exp), nil
}

// fileSignature is the URL-safe HMAC-SHA256 of a file and an expiry.
func fileSignature(secret []byte, jobID, name, exp string) string {
	m := hmac.New(sha256.New, secret)
	m.Write([]byte(jobID))
	m.Write([]byte{0})
	m.Write([]byte(name))
	m.Write([]byte{0})
	m.Write([]byte(exp))
	return base64.RawURLEncoding.EncodeToString(m.Sum(nil))
}

// checkSigningKeys validates Options.SigningKeys.
func checkSigningKeys(keys []SigningKey) error {
	seen := map[string]bool{}
	for _, k := range keys {
		if k.ID == "" || len(k.ID) > 64 || !validJobID(k.ID) || seen[k.ID] {
			return errors.New("bulkexport: Options.SigningKeys: each key needs a unique ID of [A-Za-z0-9._-]")
		}
		if len(k.Secret) < 32 {
			return errors.New("bulkexport: Options.SigningKeys: key " + k.ID + " has fewer than 32 secret bytes")
		}
		seen[k.ID] = true
	}
	return nil
}

// verifySignedFile checks the signature of a file request. It returns
// (false, nil) when the request carries none of the signature parameters
// exp, kid and sig (the ordinary authenticated path applies; other query
// parameters are ignored), (true, nil) for a valid, unexpired
// signature of this very file, and a 403 error otherwise: a signature that
// was tampered with, made for another file, made with an unknown key, or
// expired.
func (h *Handler) verifySignedFile(r *http.Request, jobID, name string) (bool, error) {
	if r.URL.RawQuery == "" || len(h.opts.SigningKeys) == 0 {
		// Without keys the handler signs nothing: whatever the query
		// holds, it is ignored, as on any other FHIR download.
		return false, nil
	}
	q, err := url.ParseQuery(r.URL.RawQuery)
	if err != nil {
		return false, &Error{Status: http.StatusBadRequest, Code: fhirbulk.IssueInvalid, Message: "malformed query string"}
	}
	_, hasSig := q[sigParamSig]
	_, hasExp := q[sigParamExpires]
	_, hasKid := q[sigParamKey]
	if !hasSig && !hasExp && !hasKid {
		// Not a signed URL: unknown parameters are ignored, as on any
		// other FHIR download.
		return false, nil
	}
	sig, exp, kid := q.Get(sigParamSig), q.Get(sigParamExpires), q.Get(sigParamKey)
	denied := &Error{Status: http.StatusForbidden, Code: fhirbulk.IssueSecurity, Message: "the signed download URL is invalid or has expired; fetch the manifest again"}
	if len(q) != 3 || len(q[sigParamSig]) != 1 || len(q[sigParamExpires]) != 1 || len(q[sigParamKey]) != 1 {
		return false, denied
	}
	expAt, err := strconv.ParseInt(exp, 10, 64)
	if err != nil || expAt <= h.now().Unix() {
		return false, denied
	}
	for _, k := range h.opts.SigningKeys {
		if k.ID == kid {
			if hmac.Equal([]byte(sig), []byte(fileSignature(k.Secret, jobID, name, exp))) {
				return true, nil
			}
			break
		}
	}
	return false, denied
}
