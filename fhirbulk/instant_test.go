package fhirbulk

import (
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

func TestParseInstant(t *testing.T) {
	t.Parallel()
	valid := map[string]time.Time{
		"2024-01-02T03:04:05Z":          time.Date(2024, 1, 2, 3, 4, 5, 0, time.UTC),
		"2024-01-02T03:04:05.5Z":        time.Date(2024, 1, 2, 3, 4, 5, 5e8, time.UTC),
		"2024-01-02T04:04:05+01:00":     time.Date(2024, 1, 2, 3, 4, 5, 0, time.UTC),
		"2024-01-02T04:04:05 01:00":     time.Date(2024, 1, 2, 3, 4, 5, 0, time.UTC),
		"2024-01-02T04:04:05.123 01:00": time.Date(2024, 1, 2, 3, 4, 5, 123e6, time.UTC),
		"2024-01-01T22:04:05-05:00":     time.Date(2024, 1, 2, 3, 4, 5, 0, time.UTC),
	}
	for s, want := range valid {
		got, err := ParseInstant(s)
		require.NoError(t, err, s)
		require.True(t, want.Equal(got), "%s: got %v", s, got)
	}
	for _, s := range []string{"", "2024", "2024-01-02", "2024-01-02T03:04:05", "2024-01-02 03:04:05Z",
		"2024-01-02T03:04Z", "2024-02-30T00:00:00Z", "2024-01-02T03:04:05 0100", "2024-01-02T03:04:05+1:00",
		"x024-01-02T03:04:05Z", strings.Repeat("9", 41)} {
		_, err := ParseInstant(s)
		require.Error(t, err, s)
	}
}

func TestFormatInstant(t *testing.T) {
	t.Parallel()
	at := time.Date(2026, 1, 2, 4, 4, 5, 678_900_000, time.FixedZone("x", 3600))
	require.Equal(t, "2026-01-02T03:04:05.678Z", FormatInstant(at))
	back, err := ParseInstant(FormatInstant(at))
	require.NoError(t, err)
	require.True(t, back.Equal(at.Truncate(time.Millisecond)))
}
