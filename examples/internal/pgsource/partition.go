package pgsource

import (
	"context"
	"fmt"
	"math"
	"slices"
	"strconv"
	"strings"

	"github.com/bulkfhir/bulkexport"
)

// Partitioning by key range (docs/pgsource.md, "Partitioning").
//
// A part of a type is a half-open range of seq, written as a token
// "(lo,hi]": the rows with lo < seq <= hi. An empty bound is open: "(,hi]"
// is every seq up to hi, "(lo,]" every seq after lo. Partitions returns
// the ranges in order, the first open below and the last open above, each
// starting at the bound the one before ends at, so that every seq there
// is, or will be, falls in exactly one of them.

// keyRange is a parsed token: lo < seq <= hi, with lo = math.MinInt64 and
// hi = math.MaxInt64 for open bounds. The zero token "" is the whole type.
type keyRange struct {
	lo, hi int64
}

// wholeRange is every seq.
var wholeRange = keyRange{lo: math.MinInt64, hi: math.MaxInt64}

func (r keyRange) openBelow() bool { return r.lo == math.MinInt64 }
func (r keyRange) openAbove() bool { return r.hi == math.MaxInt64 }

// contains reports whether seq is in the range.
func (r keyRange) contains(seq int64) bool { return seq > r.lo && seq <= r.hi }

// String is the range's token.
func (r keyRange) String() string {
	var b strings.Builder
	b.WriteByte('(')
	if !r.openBelow() {
		b.WriteString(strconv.FormatInt(r.lo, 10))
	}
	b.WriteByte(',')
	if !r.openAbove() {
		b.WriteString(strconv.FormatInt(r.hi, 10))
	}
	b.WriteByte(']')
	return b.String()
}

// parseRange reads a token; "" is the whole range.
func parseRange(tok string) (keyRange, error) {
	if tok == "" {
		return wholeRange, nil
	}
	bad := fmt.Errorf("pgsource: invalid partition %q", tok)
	inner, ok := strings.CutPrefix(tok, "(")
	if !ok {
		return keyRange{}, bad
	}
	inner, ok = strings.CutSuffix(inner, "]")
	if !ok {
		return keyRange{}, bad
	}
	a, b, ok := strings.Cut(inner, ",")
	if !ok {
		return keyRange{}, bad
	}
	r := wholeRange
	var err error
	if a != "" {
		if r.lo, err = strconv.ParseInt(a, 10, 64); err != nil || r.lo == math.MinInt64 {
			return keyRange{}, bad
		}
	}
	if b != "" {
		if r.hi, err = strconv.ParseInt(b, 10, 64); err != nil || r.hi == math.MaxInt64 {
			return keyRange{}, bad
		}
	}
	if r.hi <= r.lo {
		return keyRange{}, bad
	}
	return r, nil
}

// splitRanges turns the bounds between parts (the last seq of every part
// but the last, in any order, possibly repeated) into contiguous ranges
// covering every seq: (,b1], (b1,b2], …, (bn,]. No bounds is no split.
func splitRanges(bounds []int64) []keyRange {
	sorted := slices.Clone(bounds)
	slices.Sort(sorted)
	out := []keyRange{}
	lo := int64(math.MinInt64)
	for _, b := range sorted {
		if b <= lo || b == math.MaxInt64 {
			continue // repeated (or unusable) bound: no empty part
		}
		out = append(out, keyRange{lo: lo, hi: b})
		lo = b
	}
	if len(out) == 0 {
		return nil
	}
	return append(out, keyRange{lo: lo, hi: math.MaxInt64})
}

// Partitions implements bulkexport.Partitioner: it splits the rows of typ
// that q selects (Export's WHERE clause, so that parts are even in what
// they export) into at most max ranges of seq with about equal row
// counts. One query reads the selected keys once (an index range scan on
// (type, seq) at system level), counts them, and takes the bounds with
// percentile_disc: parts = min(max, rows / PageSize), so that no part is
// smaller than a page, and none (nil: the type stays whole) below two
// pages. The ranges are open at both ends, so rows added after the split
// still belong to exactly one part.
func (s *Source) Partitions(ctx context.Context, q *bulkexport.Query, typ string, max int) ([]string, error) {
	if max < 2 {
		return nil, nil
	}
	where, args, err := s.where(q, typ)
	if err != nil {
		return nil, err
	}
	n := len(args)
	args = append(args, max, s.pageSize)
	sql := `WITH sel AS MATERIALIZED (SELECT seq FROM ` + s.tables.resources + ` WHERE ` + where + `),
	  n AS (SELECT count(*) AS rows FROM sel),
	  p AS (SELECT rows, CASE WHEN rows < 2 * $` + strconv.Itoa(n+2) + `::bigint THEN 1
	                          ELSE least($` + strconv.Itoa(n+1) + `::bigint, rows / $` + strconv.Itoa(n+2) + `::bigint) END AS parts FROM n)
	SELECT p.rows, p.parts, CASE WHEN p.parts > 1 THEN (SELECT percentile_disc(ARRAY(
	         SELECT k::float8 / p.parts FROM generate_series(1, p.parts - 1) AS k ORDER BY k))
	       WITHIN GROUP (ORDER BY seq) FROM sel) END
	FROM p`
	var (
		rows, parts int64
		bounds      []*int64
	)
	if err := s.pool.QueryRow(ctx, sql, args...).Scan(&rows, &parts, &bounds); err != nil {
		return nil, fmt.Errorf("pgsource: partitions of %s: %w", typ, err)
	}
	if parts < 2 {
		return nil, nil
	}
	picked := make([]int64, 0, len(bounds))
	for _, b := range bounds {
		if b != nil {
			picked = append(picked, *b)
		}
	}
	ranges := splitRanges(picked)
	tokens := make([]string, len(ranges))
	for i, r := range ranges {
		tokens[i] = r.String()
	}
	return tokens, nil
}
