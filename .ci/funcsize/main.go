// Command funcsize checks the size of the functions of one Go package
// directory: it fails when a function (test files aside) has more lines
// than -max-lines or a cyclomatic complexity above -max-complexity, and
// prints the -top largest by complexity either way.
//
//	go run ./.ci/funcsize -max-lines 100 -max-complexity 30 .
//
// Complexity is counted the usual way: 1, plus one for each if, for,
// range, case clause (default aside), select case, && and ||.
package main

import (
	"flag"
	"fmt"
	"go/ast"
	"go/parser"
	"go/token"
	"os"
	"path/filepath"
	"sort"
	"strings"
)

type fn struct {
	name       string
	pos        token.Position
	lines      int
	complexity int
}

func main() {
	maxLines := flag.Int("max-lines", 100, "the most lines a function may have")
	maxCx := flag.Int("max-complexity", 30, "the highest cyclomatic complexity a function may have")
	top := flag.Int("top", 10, "how many functions to list")
	flag.Parse()
	if flag.NArg() != 1 {
		fmt.Fprintln(os.Stderr, "usage: funcsize [flags] DIR")
		os.Exit(2)
	}
	fset := token.NewFileSet()
	pkgs, err := parser.ParseDir(fset, flag.Arg(0), func(fi os.FileInfo) bool {
		return !strings.HasSuffix(fi.Name(), "_test.go")
	}, 0)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	var fns []fn
	for _, p := range pkgs {
		for _, f := range p.Files {
			ast.Inspect(f, func(n ast.Node) bool {
				var body *ast.BlockStmt
				var name string
				switch d := n.(type) {
				case *ast.FuncDecl:
					body, name = d.Body, d.Name.Name
					if d.Recv != nil && len(d.Recv.List) == 1 {
						name = recvName(d.Recv.List[0].Type) + "." + name
					}
				default:
					return true
				}
				if body == nil {
					return false
				}
				start, end := fset.Position(n.Pos()), fset.Position(n.End())
				fns = append(fns, fn{name, start, end.Line - start.Line + 1, complexity(body)})
				return false
			})
		}
	}
	sort.Slice(fns, func(i, j int) bool {
		if fns[i].complexity != fns[j].complexity {
			return fns[i].complexity > fns[j].complexity
		}
		return fns[i].lines > fns[j].lines
	})
	bad := false
	for i, f := range fns {
		over := f.lines > *maxLines || f.complexity > *maxCx
		if i < *top || over {
			mark := ""
			if over {
				mark, bad = "  TOO BIG", true
			}
			fmt.Printf("%3d complexity %4d lines  %s (%s:%d)%s\n", f.complexity, f.lines, f.name,
				filepath.Base(f.pos.Filename), f.pos.Line, mark)
		}
	}
	if bad {
		fmt.Printf("funcsize: functions over %d lines or complexity %d\n", *maxLines, *maxCx)
		os.Exit(1)
	}
}

func recvName(e ast.Expr) string {
	switch t := e.(type) {
	case *ast.StarExpr:
		return recvName(t.X)
	case *ast.IndexExpr:
		return recvName(t.X)
	case *ast.IndexListExpr:
		return recvName(t.X)
	case *ast.Ident:
		return t.Name
	}
	return "?"
}

// complexity counts the decision points of a body, function literals
// included (they run as part of the function that holds them).
func complexity(body *ast.BlockStmt) int {
	c := 1
	ast.Inspect(body, func(n ast.Node) bool {
		switch x := n.(type) {
		case *ast.IfStmt, *ast.ForStmt, *ast.RangeStmt:
			c++
		case *ast.CaseClause:
			if x.List != nil {
				c++
			}
		case *ast.CommClause:
			if x.Comm != nil {
				c++
			}
		case *ast.BinaryExpr:
			if x.Op == token.LAND || x.Op == token.LOR {
				c++
			}
		}
		return true
	})
	return c
}
