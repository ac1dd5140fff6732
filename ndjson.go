package bulkexport

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"math/bits"
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
	if s.badUTF8 {
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
	badUTF8   bool // some string is not valid UTF-8
}

// strSafe marks the ASCII bytes that may appear in a JSON string unescaped
// and need no further look.
var strSafe = func() (t [256]bool) {
	for c := 0x20; c < utf8.RuneSelf; c++ {
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
// contents and whether it holds escapes. It also checks the contents are
// valid UTF-8, noting a failure in s.badUTF8 without stopping the scan, so
// that a resource that is also malformed is still reported as malformed.
// (Outside strings, valid JSON is ASCII, so checking the strings checks
// the whole resource.)
func (s *jsonScanner) str() (start, end int, escaped, ok bool) {
	b := s.b
	start = s.i + 1
	i := start
	// The common case: the contents up to the next '"' are plain ASCII
	// with no escape. Look at the first 32 bytes a word at a time (most
	// strings are short: keys, codes, ids).
	for range 4 {
		if i+8 > len(b) {
			return s.strSlow(start, i)
		}
		if m := swarStop(binary.LittleEndian.Uint64(b[i:])); m != 0 {
			// The lowest flagged byte is a real stop: a false flag only
			// comes from a borrow out of a lower, real one.
			i += bits.TrailingZeros64(m) >> 3
			if b[i] == '"' {
				s.i = i + 1
				return start, i, false, true
			}
			return s.strSlow(start, i)
		}
		i += 8
	}
	// A long string: find the quote and any backslash with the
	// vectorized bytes.IndexByte, then check for control and non-ASCII
	// bytes a word at a time.
	q := bytes.IndexByte(b[i:], '"')
	if q < 0 {
		return 0, 0, false, false
	}
	end = i + q
	if body := b[i:end]; bytes.IndexByte(body, '\\') < 0 && plainASCII(body) {
		s.i = end + 1
		return start, end, false, true
	}
	return s.strSlow(start, i)
}

// plainASCII reports whether b holds only bytes from 0x20 to 0x7f.
func plainASCII(b []byte) bool {
	var acc uint64
	i := 0
	for ; i+32 <= len(b); i += 32 {
		x0 := binary.LittleEndian.Uint64(b[i:])
		x1 := binary.LittleEndian.Uint64(b[i+8:])
		x2 := binary.LittleEndian.Uint64(b[i+16:])
		x3 := binary.LittleEndian.Uint64(b[i+24:])
		acc |= x0 | (x0 - 0x20*swarOnes) | x1 | (x1 - 0x20*swarOnes) |
			x2 | (x2 - 0x20*swarOnes) | x3 | (x3 - 0x20*swarOnes)
	}
	for ; i+8 <= len(b); i += 8 {
		x := binary.LittleEndian.Uint64(b[i:])
		acc |= x | (x - 0x20*swarOnes)
	}
	if acc&swarHigh != 0 {
		return false
	}
	for ; i < len(b); i++ {
		if !strSafe[b[i]] {
			return false
		}
	}
	return true
}

// strSlow is str for contents with escapes, control or non-ASCII bytes,
// going on from i (b[start:i] is plain).
func (s *jsonScanner) strSlow(start, i int) (_, end int, escaped, ok bool) {
	b := s.b
	for {
		// Skip plain ASCII 8 bytes at a time: no '"', no '\\', no control
		// byte, no byte of a multi-byte UTF-8 sequence.
		for i+8 <= len(b) && swarStop(binary.LittleEndian.Uint64(b[i:])) == 0 {
			i += 8
		}
		for i < len(b) && strSafe[b[i]] {
			i++
		}
		if i >= len(b) {
			return 0, 0, false, false
		}
		switch c := b[i]; {
		case c == '"':
			s.i = i + 1
			return start, i, escaped, true
		case c == '\\':
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
		case c >= utf8.RuneSelf:
			r, n := utf8.DecodeRune(b[i:])
			if r == utf8.RuneError && n == 1 {
				s.badUTF8 = true
			}
			i += n
		default: // a control character
			return 0, 0, false, false
		}
	}
}

// swarStop is non-zero when some byte of x is '"', '\\', below 0x20 or
// above 0x7f.
func swarStop(x uint64) uint64 {
	q := x ^ swarQuote
	e := x ^ swarBackslash
	return (x | (q-swarOnes)&^q | (e-swarOnes)&^e | (x-0x20*swarOnes)&^x) & swarHigh
}

const (
	swarOnes      = 0x0101010101010101
	swarHigh      = 0x8080808080808080
	swarQuote     = '"' * swarOnes
	swarBackslash = '\\' * swarOnes
)

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
