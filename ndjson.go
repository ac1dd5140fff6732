package bulkexport

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"unicode/utf8"
)

// maxJSONDepth bounds nesting in exported resources. FHIR resources are
// far shallower; the bound keeps a hostile resource from exhausting the
// stack.
const maxJSONDepth = 256

// errBadResource is why a line was rejected.
var errBadResource = errors.New("not a single JSON object")

// checkResource validates one resource for an NDJSON line of type typ. It
// returns the bytes to write: raw itself when it is already a single line,
// or a compacted copy (written over scratch, compacted true) when it spans
// lines. It never returns bytes that would break NDJSON.
func checkResource(raw []byte, typ string, scratch []byte) (line []byte, compacted bool, err error) {
	return checkResourceIn(raw, typ, nil, scratch)
}

// checkResourceIn is checkResource for a line whose resourceType must be
// typ or, when allowed is not nil, any key of allowed (typ then only names
// the accepted types in errors). It allocates nothing unless the resource
// must be compacted or is rejected.
func checkResourceIn(raw []byte, typ string, allowed map[string]bool, scratch []byte) (line []byte, compacted bool, err error) {
	s := jsonScanner{b: raw}
	s.skipWS()
	if s.i >= len(s.b) || s.b[s.i] != '{' {
		return nil, false, errBadResource
	}
	if !s.object(0) {
		return nil, false, fmt.Errorf("%w: malformed JSON at byte %d", errBadResource, s.i)
	}
	s.skipWS()
	if s.i != len(s.b) {
		return nil, false, fmt.Errorf("%w: trailing data at byte %d", errBadResource, s.i)
	}
	if !utf8.Valid(raw) {
		return nil, false, fmt.Errorf("%w: invalid UTF-8", errBadResource)
	}
	if s.rtStart < 0 {
		return nil, false, fmt.Errorf("resource has no resourceType")
	}
	rt := raw[s.rtStart:s.rtEnd]
	if !typeAccepted(rt, typ, allowed) {
		var got string
		if !s.rtEscaped || json.Unmarshal(raw[s.rtStart-1:s.rtEnd+1], &got) != nil || !typeAccepted([]byte(got), typ, allowed) {
			return nil, false, fmt.Errorf("resourceType %q in a file of %s", rt, typ)
		}
	}
	if !s.newline {
		// Leading or trailing spaces are harmless on a line, but trim them
		// so that lines are canonical.
		return bytes.TrimSpace(raw), false, nil
	}
	buf := bytes.NewBuffer(scratch[:0])
	if err := json.Compact(buf, raw); err != nil {
		return nil, false, fmt.Errorf("%w: %v", errBadResource, err)
	}
	return buf.Bytes(), true, nil
}

// typeAccepted compares without allocating: the compiler turns both
// string(rt) conversions into plain byte comparisons.
func typeAccepted(rt []byte, typ string, allowed map[string]bool) bool {
	if allowed != nil {
		return allowed[string(rt)]
	}
	return string(rt) == typ
}

// jsonScanner is a validating JSON scanner that allocates nothing. It
// notes whether whitespace held a line break and where the top-level
// "resourceType" string is.
type jsonScanner struct {
	b         []byte
	i         int
	newline   bool
	rtStart   int
	rtEnd     int
	rtEscaped bool
	init      bool
}

// strSafe marks the bytes that may appear in a JSON string unescaped and
// need no further look.
var strSafe = func() (t [256]bool) {
	for c := 0x20; c < 256; c++ {
		t[c] = c != '"' && c != '\\'
	}
	return t
}()

func (s *jsonScanner) skipWS() {
	if s.i < len(s.b) && s.b[s.i] > ' ' {
		return // the common case: no whitespace at all
	}
	s.skipWSSlow()
}

func (s *jsonScanner) skipWSSlow() {
	for s.i < len(s.b) {
		switch s.b[s.i] {
		case ' ', '\t':
		case '\n', '\r':
			s.newline = true
		default:
			return
		}
		s.i++
	}
}

// object scans {...} starting at s.b[s.i] == '{'.
func (s *jsonScanner) object(depth int) bool {
	if depth >= maxJSONDepth {
		return false
	}
	if !s.init {
		s.init = true
		s.rtStart = -1
	}
	s.i++ // {
	s.skipWS()
	if s.i < len(s.b) && s.b[s.i] == '}' {
		s.i++
		return true
	}
	for {
		if s.i >= len(s.b) || s.b[s.i] != '"' {
			return false
		}
		ks, ke, kesc, ok := s.str()
		if !ok {
			return false
		}
		s.skipWS()
		if s.i >= len(s.b) || s.b[s.i] != ':' {
			return false
		}
		s.i++
		s.skipWS()
		if depth == 0 && !kesc && string(s.b[ks:ke]) == "resourceType" {
			if s.i >= len(s.b) || s.b[s.i] != '"' {
				return false // resourceType must be a string
			}
			vs, ve, vesc, ok := s.str()
			if !ok || s.rtStart >= 0 {
				return false // two resourceType keys
			}
			s.rtStart, s.rtEnd, s.rtEscaped = vs, ve, vesc
		} else if !s.value(depth + 1) {
			return false
		}
		s.skipWS()
		if s.i >= len(s.b) {
			return false
		}
		switch s.b[s.i] {
		case ',':
			s.i++
			s.skipWS()
		case '}':
			s.i++
			return true
		default:
			return false
		}
	}
}

func (s *jsonScanner) array(depth int) bool {
	if depth >= maxJSONDepth {
		return false
	}
	s.i++ // [
	s.skipWS()
	if s.i < len(s.b) && s.b[s.i] == ']' {
		s.i++
		return true
	}
	for {
		if !s.value(depth + 1) {
			return false
		}
		s.skipWS()
		if s.i >= len(s.b) {
			return false
		}
		switch s.b[s.i] {
		case ',':
			s.i++
			s.skipWS()
		case ']':
			s.i++
			return true
		default:
			return false
		}
	}
}

func (s *jsonScanner) value(depth int) bool {
	if s.i >= len(s.b) {
		return false
	}
	switch c := s.b[s.i]; {
	case c == '"':
		_, _, _, ok := s.str()
		return ok
	case c == '{':
		return s.object(depth)
	case c == '[':
		return s.array(depth)
	case c == 't':
		return s.lit("true")
	case c == 'f':
		return s.lit("false")
	case c == 'n':
		return s.lit("null")
	case c == '-' || c >= '0' && c <= '9':
		return s.number()
	}
	return false
}

func (s *jsonScanner) lit(w string) bool {
	if len(s.b)-s.i < len(w) || string(s.b[s.i:s.i+len(w)]) != w {
		return false
	}
	s.i += len(w)
	return true
}

// str scans a string at s.b[s.i] == '"' and returns the bounds of its
// contents and whether it holds escapes.
func (s *jsonScanner) str() (start, end int, escaped, ok bool) {
	b := s.b
	i := s.i + 1
	start = i
	for {
		// Skip 8 plain bytes at a time: no '"', no '\\', no control byte.
		for i+8 <= len(b) {
			x := binary.LittleEndian.Uint64(b[i:])
			if hasZeroByte(x^swarQuote)|hasZeroByte(x^swarBackslash)|hasLess20(x) != 0 {
				break
			}
			i += 8
		}
		for i < len(b) && strSafe[b[i]] {
			i++
		}
		if i >= len(b) {
			return 0, 0, false, false
		}
		switch b[i] {
		case '"':
			s.i = i + 1
			return start, i, escaped, true
		case '\\':
			escaped = true
			if i+1 >= len(b) {
				return 0, 0, false, false
			}
			switch b[i+1] {
			case '"', '\\', '/', 'b', 'f', 'n', 'r', 't':
				i += 2
			case 'u':
				if i+6 > len(b) || !isHex(b[i+2]) || !isHex(b[i+3]) || !isHex(b[i+4]) || !isHex(b[i+5]) {
					return 0, 0, false, false
				}
				i += 6
			default:
				return 0, 0, false, false
			}
		default: // a control character
			return 0, 0, false, false
		}
	}
}

const (
	swarOnes      = 0x0101010101010101
	swarHigh      = 0x8080808080808080
	swarQuote     = '"' * swarOnes
	swarBackslash = '\\' * swarOnes
)

// hasZeroByte is non-zero when some byte of x is 0.
func hasZeroByte(x uint64) uint64 { return (x - swarOnes) &^ x & swarHigh }

// hasLess20 is non-zero when some byte of x is below 0x20.
func hasLess20(x uint64) uint64 { return (x - 0x20*swarOnes) &^ x & swarHigh }

func isHex(c byte) bool {
	return c >= '0' && c <= '9' || c >= 'a' && c <= 'f' || c >= 'A' && c <= 'F'
}

func (s *jsonScanner) number() bool {
	b, i := s.b, s.i
	if b[i] == '-' {
		i++
	}
	switch {
	case i < len(b) && b[i] == '0':
		i++
	case i < len(b) && b[i] >= '1' && b[i] <= '9':
		for i < len(b) && b[i] >= '0' && b[i] <= '9' {
			i++
		}
	default:
		return false
	}
	if i < len(b) && b[i] == '.' {
		i++
		d := i
		for i < len(b) && b[i] >= '0' && b[i] <= '9' {
			i++
		}
		if i == d {
			return false
		}
	}
	if i < len(b) && (b[i] == 'e' || b[i] == 'E') {
		i++
		if i < len(b) && (b[i] == '+' || b[i] == '-') {
			i++
		}
		d := i
		for i < len(b) && b[i] >= '0' && b[i] <= '9' {
			i++
		}
		if i == d {
			return false
		}
	}
	s.i = i
	return true
}
