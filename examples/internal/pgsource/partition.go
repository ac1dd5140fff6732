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

// gridPerPart is how many quantiles of the keys Partitions reads per part
// it may make: the bounds of a split into fewer parts are picked among
// them, within half a grid step (1/(2*gridPerPart*max) of the rows) of
// where they belong.
const gridPerPart = 8

// partsFor is how many parts rows selected rows make with pages of
// pageSize, at most max: 1 (no split) below two pages, else about one per
// page, so that no part is smaller than a page.
func partsFor(rows int64, pageSize, max int) int {
	if max < 2 || pageSize < 1 || rows < 2*int64(pageSize) {
		return 1
	}
	return int(min(int64(max), rows/int64(pageSize)))
}

// pickBounds picks the bounds of parts equal parts from grid, the keys at
// the quantiles j/(len(grid)+1), j = 1 … len(grid).
func pickBounds(grid []int64, parts int) []int64 {
	g := len(grid) + 1
	var out []int64
	for k := 1; k < parts; k++ {
		j := int(math.Round(float64(k)*float64(g)/float64(parts))) - 1
		out = append(out, grid[max(0, min(len(grid)-1, j))])
	}
	return out
}

// Partitions implements bulkexport.Partitioner: it splits the rows of typ
// that q selects (Export's WHERE clause, so that parts are even in what
// they export) into at most max ranges of seq with about equal row
// counts, open at both ends, so that rows added after the split still
// belong to exactly one part. One aggregate reads the selected keys once
// (an index scan on (type, seq)): their count, and their quantiles with
// percentile_disc on a grid of gridPerPart*max steps. parts = min(max,
// rows / PageSize), so that no part is smaller than a page; a type with
// fewer than two pages of rows is not split (nil).
func (s *Source) Partitions(ctx context.Context, q *bulkexport.Query, typ string, max int) ([]string, error) {
	if max < 2 {
		return nil, nil
	}
	where, args, err := s.conditions(q, typ, false) // q.Partition, if any, is not split further
	if err != nil {
		return nil, err
	}
	steps := gridPerPart * min(max, 64)
	fractions := make([]float64, steps-1)
	for j := range fractions {
		fractions[j] = float64(j+1) / float64(steps)
	}
	args = append(args, fractions)
	var (
		rows int64
		grid []*int64
	)
	err = s.pool.QueryRow(ctx, `SELECT count(*), percentile_disc($`+strconv.Itoa(len(args))+`::float8[]) WITHIN GROUP (ORDER BY seq) FROM `+
		s.tables.resources+` WHERE `+where, args...).Scan(&rows, &grid)
	if err != nil {
		return nil, fmt.Errorf("pgsource: partitions of %s: %w", typ, err)
	}
	parts := partsFor(rows, s.pageSize, max)
	if parts < 2 || len(grid) != len(fractions) {
		return nil, nil
	}
	keys := make([]int64, len(grid))
	for i, k := range grid {
		if k == nil { // no rows: not reached, rows >= 2 pages
			return nil, nil
		}
		keys[i] = *k
	}
	ranges := splitRanges(pickBounds(keys, parts))
	tokens := make([]string, len(ranges))
	for i, r := range ranges {
		tokens[i] = r.String()
	}
	return tokens, nil
}
