package fhirbulk

import (
	"fmt"
	"time"
)

// FormatInstant formats t as a FHIR instant in UTC with millisecond
// precision, e.g. 2026-01-02T03:04:05.678Z.
func FormatInstant(t time.Time) string {
	return t.UTC().Format("2006-01-02T15:04:05.000Z07:00")
}

// ParseInstant parses a FHIR instant: YYYY-MM-DDThh:mm:ss[.fraction] with
// Z or a ±hh:mm offset. A space where the offset's "+" belongs (an
// unencoded "+" in a query string) is taken as "+".
func ParseInstant(s string) (time.Time, error) {
	if len(s) > 40 {
		return time.Time{}, fmt.Errorf("%.40q… is not a FHIR instant", s)
	}
	if n := len(s); n > 6 && s[n-6] == ' ' {
		s = s[:n-6] + "+" + s[n-5:]
	}
	if len(s) < 20 || s[10] != 'T' {
		return time.Time{}, fmt.Errorf("%q is not a FHIR instant (YYYY-MM-DDThh:mm:ss with Z or an offset)", s)
	}
	t, err := time.Parse(time.RFC3339Nano, s)
	if err != nil {
		return time.Time{}, fmt.Errorf("%q is not a FHIR instant (YYYY-MM-DDThh:mm:ss with Z or an offset)", s)
	}
	return t, nil
}
