// Command testsum reads the output of "go test -json" on stdin and prints
// what a plain "go test" would: one line per package, and the whole output
// of every package that failed. It then counts the tests of the database
// and fault-injection packages, which must really run in CI: with
// BULKEXPORT_TEST_POSTGRES_URL set, a skipped test in one of them is an
// error.
//
//	go test -race -json ./... 2>&1 | go run ./.ci/testsum -db pgstore,sqlitestore
//
// Lines that are not JSON (build errors) are copied through. It exits 1 if
// a package failed or a database test skipped while it should have run.
package main

import (
	"bufio"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"slices"
	"strings"
)

type event struct {
	Action  string
	Package string
	Test    string
	Output  string
	Elapsed float64
}

type pkg struct {
	out                   []string
	ran, skipped, failed  int
	skips                 []string
	lastOutput            map[string]string // per test: its last log line
	done, failedPkg, isDB bool
}

func main() {
	dbList := flag.String("db", "", "comma-separated substrings of the import paths of database and fault-test packages")
	flag.Parse()
	var dbMatch []string
	for _, s := range strings.Split(*dbList, ",") {
		if s = strings.TrimSpace(s); s != "" {
			dbMatch = append(dbMatch, s)
		}
	}
	pkgs := map[string]*pkg{}
	var order []string
	get := func(name string) *pkg {
		p := pkgs[name]
		if p == nil {
			p = &pkg{lastOutput: map[string]string{}}
			for _, m := range dbMatch {
				if strings.Contains(name, m) {
					p.isDB = true
				}
			}
			pkgs[name] = p
			order = append(order, name)
		}
		return p
	}

	passed, failed := 0, 0
	sc := bufio.NewScanner(os.Stdin)
	sc.Buffer(make([]byte, 1<<20), 64<<20)
	for sc.Scan() {
		line := sc.Bytes()
		var e event
		if len(line) == 0 || line[0] != '{' || json.Unmarshal(line, &e) != nil {
			fmt.Println(string(line))
			continue
		}
		if e.Package == "" {
			if e.Output != "" {
				fmt.Print(e.Output)
			}
			continue
		}
		p := get(e.Package)
		switch e.Action {
		case "output", "build-output":
			p.out = append(p.out, e.Output)
			if e.Test != "" {
				if s := strings.TrimSpace(e.Output); s != "" && !strings.HasPrefix(s, "---") && !strings.HasPrefix(s, "===") {
					p.lastOutput[e.Test] = s
				}
			}
		case "pass", "fail", "skip":
			if e.Test == "" {
				p.done = true
				p.failedPkg = e.Action == "fail"
				report(e.Package, p)
				if p.failedPkg {
					failed++
				} else if e.Action == "pass" {
					passed++
				}
				continue
			}
			if strings.Contains(e.Test, "/") {
				continue // count top-level tests; subtests are their parts
			}
			switch e.Action {
			case "pass":
				p.ran++
			case "fail":
				p.ran++
				p.failed++
			case "skip":
				p.skipped++
				p.skips = append(p.skips, e.Test+": "+p.lastOutput[e.Test])
			}
		}
	}
	if err := sc.Err(); err != nil {
		fmt.Fprintln(os.Stderr, "testsum:", err)
		os.Exit(1)
	}
	for _, name := range order {
		if p := pkgs[name]; !p.done {
			// A package that never finished (the binary crashed or did not
			// build): show everything it said.
			fmt.Printf("FAIL\t%s (did not finish)\n", name)
			fmt.Print(strings.Join(p.out, ""))
			failed++
		}
	}

	status := 0
	if len(dbMatch) > 0 {
		fmt.Println("== database and fault-injection tests (uncached)")
		envSet := os.Getenv("BULKEXPORT_TEST_POSTGRES_URL") != ""
		names := slices.Clone(order)
		slices.Sort(names)
		ran, skipped := 0, 0
		for _, name := range names {
			p := pkgs[name]
			if !p.isDB || p.ran+p.skipped == 0 {
				continue
			}
			fmt.Printf("%-60s %4d ran, %3d skipped\n", name, p.ran, p.skipped)
			for _, s := range p.skips {
				fmt.Printf("    skipped %s\n", s)
			}
			ran += p.ran
			skipped += p.skipped
		}
		fmt.Printf("database and fault tests: %d ran, %d skipped\n", ran, skipped)
		if ran == 0 {
			fmt.Println("no database or fault test ran")
			status = 1
		}
		if skipped > 0 && envSet {
			fmt.Println("database or fault tests skipped although BULKEXPORT_TEST_POSTGRES_URL is set")
			status = 1
		}
	}
	fmt.Printf("packages: %d passed, %d failed\n", passed, failed)
	if failed > 0 {
		status = 1
	}
	os.Exit(status)
}

// report prints a finished package: its summary line, or everything it
// said when it failed.
func report(name string, p *pkg) {
	if p.failedPkg {
		fmt.Print(strings.Join(p.out, ""))
		return
	}
	for i := len(p.out) - 1; i >= 0; i-- {
		s := p.out[i]
		if strings.HasPrefix(s, "ok ") || strings.HasPrefix(s, "?") || strings.HasPrefix(s, "ok\t") {
			fmt.Print(s)
			return
		}
	}
	fmt.Printf("ok\t%s\n", name)
}
