package main

import (
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/bulkfhir/bulkexport/client"
)

// ui reports progress on its writer (stdout for export, stderr for
// status --wait): a progress line redrawn in place on a terminal, plain
// lines otherwise (logs, pipes, files).
type ui struct {
	w   io.Writer
	tty bool

	mu       sync.Mutex
	drawn    bool      // a progress line is on the screen (tty)
	lastDraw time.Time // throttles redraws
	lastWait string    // the last progress text printed (non-tty)

	total  int              // files to download
	done   int              // files complete
	bytes  map[string]int64 // per file path
	frames int
}

// isTerminal reports whether w is a character device (a terminal),
// without golang.org/x/term.
func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	fi, err := f.Stat()
	return err == nil && fi.Mode()&os.ModeCharDevice != 0
}

func newUI(w io.Writer) *ui {
	return &ui{w: w, tty: isTerminal(w), bytes: map[string]int64{}}
}

// printf prints a line of its own, below any progress line.
func (u *ui) printf(format string, args ...any) {
	u.mu.Lock()
	defer u.mu.Unlock()
	u.clear()
	fmt.Fprintf(u.w, format, args...)
}

// clear removes the progress line (tty); u.mu is held.
func (u *ui) clear() {
	if u.drawn {
		fmt.Fprint(u.w, "\r\033[K")
		u.drawn = false
	}
}

// draw replaces the progress line, at most every 100ms unless force.
func (u *ui) draw(line string, force bool) {
	now := time.Now()
	if !force && u.drawn && now.Sub(u.lastDraw) < 100*time.Millisecond {
		return
	}
	u.lastDraw = now
	fmt.Fprint(u.w, "\r\033[K"+line)
	u.drawn = true
}

// end closes the progress line.
func (u *ui) end() {
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.drawn {
		fmt.Fprintln(u.w)
		u.drawn = false
	}
}

var spinner = []string{"|", "/", "-", `\`}

// waiting is Wait's progress callback.
func (u *ui) waiting(st *client.Status) {
	u.mu.Lock()
	defer u.mu.Unlock()
	text := st.Progress
	if text == "" {
		text = "in progress"
	}
	next := ""
	if st.RetryAfter > 0 {
		next = " (server asks to poll again in " + st.RetryAfter.String() + ")"
	}
	if u.tty {
		u.frames++
		u.draw(spinner[u.frames%len(spinner)]+" exporting: "+text+next, true)
		return
	}
	if text != u.lastWait {
		u.lastWait = text
		fmt.Fprintf(u.w, "exporting: %s%s\n", text, next)
	}
}

func (u *ui) startDownload(total int) {
	u.mu.Lock()
	defer u.mu.Unlock()
	u.total, u.done = total, 0
}

// downloaded is Download's progress callback (calls are serialised).
func (u *ui) downloaded(p client.Progress) {
	u.mu.Lock()
	defer u.mu.Unlock()
	f := p.File
	u.bytes[f.Path] = f.Bytes
	if p.Done {
		u.done++
	}
	if !u.tty {
		if p.Done {
			what := "downloaded"
			switch {
			case f.Skipped:
				what = "already complete"
			case f.Resumed:
				what = "downloaded (resumed)"
			}
			fmt.Fprintf(u.w, "[%d/%d] %s %s: %d resources, %d bytes\n", u.done, u.total, what, filepath.Base(f.Path), f.Lines, f.Bytes)
		}
		return
	}
	var sum int64
	for _, b := range u.bytes {
		sum += b
	}
	const width = 30
	filled := 0
	if u.total > 0 {
		filled = u.done * width / u.total
	}
	bar := "[" + strings.Repeat("#", filled) + strings.Repeat("-", width-filled) + "]"
	u.draw(fmt.Sprintf("%s %d/%d files  %s", bar, u.done, u.total, humanBytes(sum)), p.Done)
}

func humanBytes(n int64) string {
	const unit = 1024
	if n < unit {
		return strconv.FormatInt(n, 10) + " B"
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}

// printTable prints one row per file (type, resources, bytes, file) and a
// total.
func printTable(w io.Writer, files []client.File) {
	type row struct{ typ, count, bytes, name string }
	rows := []row{{"TYPE", "COUNT", "BYTES", "FILE"}}
	var count, size int64
	for _, f := range files {
		typ := f.Type
		if f.Kind != "output" {
			typ += " (" + f.Kind + ")"
		}
		rows = append(rows, row{typ, strconv.FormatInt(f.Lines, 10), strconv.FormatInt(f.Bytes, 10), filepath.Base(f.Path)})
		count += f.Lines
		size += f.Bytes
	}
	rows = append(rows, row{"TOTAL", strconv.FormatInt(count, 10), strconv.FormatInt(size, 10), fmt.Sprintf("%d files", len(files))})
	var wt, wc, wb int
	for _, r := range rows {
		wt, wc, wb = max(wt, len(r.typ)), max(wc, len(r.count)), max(wb, len(r.bytes))
	}
	for _, r := range rows {
		fmt.Fprintf(w, "%-*s  %*s  %*s  %s\n", wt, r.typ, wc, r.count, wb, r.bytes, r.name)
	}
}
