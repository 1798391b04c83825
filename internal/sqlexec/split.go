// Package sqlexec owns `shadowctl exec`: splitting a migration file into
// statements (quotes, dollar quotes, comments, parentheses and BEGIN ATOMIC
// bodies respected), deciding which statements cannot run inside a
// transaction block, running them one by one under lock_timeout with retries
// and jitter (cleaning up the INVALID index a failed CREATE INDEX CONCURRENTLY
// leaves), and the contract guard for DROP COLUMN. It does not take the
// migration advisory lock (the caller does, through package lock) and it does
// not track which files have run (that is Flyway's, goose's... job).
package sqlexec

import (
	"errors"
	"fmt"
	"strings"
)

// ErrUnterminated means the file ends inside a quote, a dollar quote or a
// block comment.
var ErrUnterminated = errors.New("unterminated quoted string, dollar quote or comment")

// Statement is one SQL statement of a file.
type Statement struct {
	// Num is the 1-based position of the statement in the file.
	Num int
	// Line is the 1-based line where the statement starts.
	Line int
	// SQL is the statement text, leading comments and the trailing
	// semicolon removed.
	SQL string

	toks []token
}

// FirstLine is the statement's first line, for messages.
func (s Statement) FirstLine() string {
	l, _, _ := strings.Cut(s.SQL, "\n")
	l = strings.TrimSpace(l)
	if len(l) > 120 {
		l = l[:117] + "..."
	}
	return l
}

// String names the statement for operators: number, line and first line.
func (s Statement) String() string {
	return fmt.Sprintf("statement %d (line %d: %s)", s.Num, s.Line, s.FirstLine())
}

type tokKind int

const (
	tWord   tokKind = iota // keyword or unquoted identifier (may contain $)
	tQIdent                // "quoted identifier"
	tString                // '...', E'...', $tag$...$tag$
	tNumber
	tParam // $1
	tPunct // one character: ( ) , ; . and operators
)

type token struct {
	kind       tokKind
	start, end int // byte offsets in the source
	text       string
}

// upper is a word token's text in upper case ("" for other kinds).
func (t token) upper() string {
	if t.kind != tWord {
		return ""
	}
	return strings.ToUpper(t.text)
}

// ident is the identifier a word or quoted identifier names (case-folded
// like PostgreSQL does), and whether the token is one.
func (t token) ident() (string, bool) {
	switch t.kind {
	case tWord:
		return strings.ToLower(t.text), true
	case tQIdent:
		return strings.ReplaceAll(t.text[1:len(t.text)-1], `""`, `"`), true
	}
	return "", false
}

func isIdentStart(c byte) bool {
	return c == '_' || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c >= 0x80
}

func isIdentChar(c byte) bool { return isIdentStart(c) || (c >= '0' && c <= '9') || c == '$' }

// lex turns src into tokens, skipping white space and comments.
func lex(src string) ([]token, error) {
	var toks []token
	i, n := 0, len(src)
	lineAt := func(off int) int { return strings.Count(src[:off], "\n") + 1 }
	for i < n {
		c := src[i]
		switch {
		case c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v':
			i++
		case c == '-' && i+1 < n && src[i+1] == '-':
			for i < n && src[i] != '\n' {
				i++
			}
		case c == '/' && i+1 < n && src[i+1] == '*':
			start, depth := i, 1
			i += 2
			for i < n && depth > 0 {
				switch {
				case src[i] == '/' && i+1 < n && src[i+1] == '*':
					depth++
					i += 2
				case src[i] == '*' && i+1 < n && src[i+1] == '/':
					depth--
					i += 2
				default:
					i++
				}
			}
			if depth > 0 {
				return nil, fmt.Errorf("line %d: block comment: %w", lineAt(start), ErrUnterminated)
			}
		case c == '\'' || ((c == 'E' || c == 'e') && i+1 < n && src[i+1] == '\''):
			start := i
			backslash := c != '\''
			if backslash {
				i++
			}
			var closed bool
			if i, closed = scanQuoted(src, i+1, '\'', backslash); !closed {
				return nil, fmt.Errorf("line %d: string literal: %w", lineAt(start), ErrUnterminated)
			}
			toks = append(toks, token{kind: tString, start: start, end: i, text: src[start:i]})
		case c == '"':
			start := i
			var closed bool
			if i, closed = scanQuoted(src, i+1, '"', false); !closed {
				return nil, fmt.Errorf("line %d: quoted identifier: %w", lineAt(start), ErrUnterminated)
			}
			toks = append(toks, token{kind: tQIdent, start: start, end: i, text: src[start:i]})
		case c == '$':
			start := i
			j := i + 1
			if j < n && src[j] >= '0' && src[j] <= '9' {
				for j < n && src[j] >= '0' && src[j] <= '9' {
					j++
				}
				toks = append(toks, token{kind: tParam, start: start, end: j, text: src[start:j]})
				i = j
				continue
			}
			for j < n && src[j] != '$' && isIdentChar(src[j]) {
				j++
			}
			if j < n && src[j] == '$' && (j == i+1 || isIdentStart(src[i+1])) {
				delim := src[i : j+1]
				k := strings.Index(src[j+1:], delim)
				if k < 0 {
					return nil, fmt.Errorf("line %d: dollar quote %s: %w", lineAt(start), delim, ErrUnterminated)
				}
				i = j + 1 + k + len(delim)
				toks = append(toks, token{kind: tString, start: start, end: i, text: src[start:i]})
				continue
			}
			i++
			toks = append(toks, token{kind: tPunct, start: start, end: i, text: "$"})
		case isIdentStart(c):
			start := i
			for i < n && isIdentChar(src[i]) {
				i++
			}
			toks = append(toks, token{kind: tWord, start: start, end: i, text: src[start:i]})
		case c >= '0' && c <= '9':
			start := i
			for i < n && (isIdentChar(src[i]) || src[i] == '.') {
				i++
			}
			toks = append(toks, token{kind: tNumber, start: start, end: i, text: src[start:i]})
		default:
			toks = append(toks, token{kind: tPunct, start: i, end: i + 1, text: src[i : i+1]})
			i++
		}
	}
	return toks, nil
}

// Split cuts a file into statements at semicolons that are outside quotes,
// dollar quotes, comments, parentheses and BEGIN ATOMIC ... END bodies.
// Empty statements are dropped.
func Split(src string) ([]Statement, error) {
	toks, err := lex(src)
	if err != nil {
		return nil, err
	}
	var out []Statement
	var cur []token
	depth, atomic := 0, 0
	flush := func() {
		if len(cur) == 0 {
			return
		}
		first, last := cur[0], cur[len(cur)-1]
		out = append(out, Statement{
			Num:  len(out) + 1,
			Line: strings.Count(src[:first.start], "\n") + 1,
			SQL:  src[first.start:last.end],
			toks: cur,
		})
		cur = nil
	}
	for _, t := range toks {
		if t.kind == tPunct {
			switch t.text {
			case "(":
				depth++
			case ")":
				if depth > 0 {
					depth--
				}
			case ";":
				if depth == 0 && atomic == 0 {
					flush()
					continue
				}
			}
		}
		if t.kind == tWord {
			switch t.upper() {
			case "ATOMIC":
				if len(cur) > 0 && cur[len(cur)-1].upper() == "BEGIN" {
					atomic++
				}
			case "CASE":
				if atomic > 0 {
					atomic++
				}
			case "END":
				if atomic > 0 {
					atomic--
				}
			}
		}
		cur = append(cur, t)
	}
	flush()
	return out, nil
}

// words returns the statement's first n tokens in upper case (words) or as
// written (other tokens).
func (s Statement) words(n int) []string {
	var w []string
	for _, t := range s.toks {
		if len(w) == n {
			break
		}
		if u := t.upper(); u != "" {
			w = append(w, u)
		} else {
			w = append(w, t.text)
		}
	}
	return w
}

func hasPrefix(w []string, p ...string) bool {
	if len(w) < len(p) {
		return false
	}
	for i := range p {
		if w[i] != p[i] {
			return false
		}
	}
	return true
}

func contains(w []string, s string) bool {
	for _, x := range w {
		if x == s {
			return true
		}
	}
	return false
}

// NonTransactional reports whether the statement cannot run inside a
// transaction block (or is best run on its own): CREATE/DROP INDEX
// CONCURRENTLY, REINDEX CONCURRENTLY/SYSTEM/DATABASE, VACUUM, CREATE/DROP
// DATABASE, ALTER DATABASE ... SET TABLESPACE, ALTER SYSTEM, CREATE/DROP
// TABLESPACE, CREATE/ALTER/DROP SUBSCRIPTION, CLUSTER, DETACH PARTITION ...
// CONCURRENTLY, ALTER TYPE ... ADD VALUE.
func (s Statement) NonTransactional() bool {
	w := s.words(16)
	switch {
	case hasPrefix(w, "CREATE", "INDEX", "CONCURRENTLY"),
		hasPrefix(w, "CREATE", "UNIQUE", "INDEX", "CONCURRENTLY"),
		hasPrefix(w, "DROP", "INDEX", "CONCURRENTLY"),
		hasPrefix(w, "REINDEX") && (contains(w, "CONCURRENTLY") || contains(w, "SYSTEM") || contains(w, "DATABASE")),
		hasPrefix(w, "VACUUM"),
		hasPrefix(w, "CREATE", "DATABASE"), hasPrefix(w, "DROP", "DATABASE"),
		hasPrefix(w, "ALTER", "DATABASE") && contains(w, "TABLESPACE"),
		hasPrefix(w, "ALTER", "SYSTEM"),
		hasPrefix(w, "CREATE", "TABLESPACE"), hasPrefix(w, "DROP", "TABLESPACE"),
		hasPrefix(w, "CREATE", "SUBSCRIPTION"), hasPrefix(w, "ALTER", "SUBSCRIPTION"), hasPrefix(w, "DROP", "SUBSCRIPTION"),
		hasPrefix(w, "CLUSTER"),
		hasPrefix(w, "ALTER", "TABLE") && contains(w, "DETACH") && contains(w, "CONCURRENTLY"),
		hasPrefix(w, "ALTER", "TYPE") && contains(w, "ADD") && contains(w, "VALUE"):
		return true
	}
	return false
}

// concurrentIndex returns, for CREATE [UNIQUE] INDEX CONCURRENTLY, the index
// name (case-folded, "" when the statement gives none) and the table as
// written, and ok.
func (s Statement) concurrentIndex() (name, table string, ok bool) {
	t := s.toks
	i := 0
	next := func() (token, bool) {
		if i >= len(t) {
			return token{}, false
		}
		i++
		return t[i-1], true
	}
	peek := func() string {
		if i >= len(t) {
			return ""
		}
		return t[i].upper()
	}
	if tk, _ := next(); tk.upper() != "CREATE" {
		return "", "", false
	}
	if peek() == "UNIQUE" {
		i++
	}
	if tk, _ := next(); tk.upper() != "INDEX" {
		return "", "", false
	}
	if tk, _ := next(); tk.upper() != "CONCURRENTLY" {
		return "", "", false
	}
	if peek() == "IF" {
		i += 3 // IF NOT EXISTS
	}
	if peek() != "ON" {
		tk, ok := next()
		if !ok {
			return "", "", false
		}
		name, _ = tk.ident()
	}
	if tk, _ := next(); tk.upper() != "ON" {
		return "", "", false
	}
	if peek() == "ONLY" {
		i++
	}
	// The table: one or two name parts separated by ".".
	start := i
	end := i
	for end < len(t) && (t[end].kind == tWord || t[end].kind == tQIdent || t[end].text == ".") {
		if t[end].kind == tWord && strings.EqualFold(t[end].text, "USING") {
			break
		}
		end++
	}
	if end == start {
		return "", "", false
	}
	var b strings.Builder
	for _, tk := range t[start:end] {
		b.WriteString(tk.text)
	}
	return name, b.String(), true
}

// txControl classifies BEGIN/START TRANSACTION ("begin"), COMMIT/END
// ("commit"), ROLLBACK/ABORT ("rollback") and other transaction control
// ("other"); "" for ordinary statements.
func (s Statement) txControl() string {
	w := s.words(3)
	switch {
	case hasPrefix(w, "BEGIN"), hasPrefix(w, "START", "TRANSACTION"):
		return "begin"
	case hasPrefix(w, "COMMIT") && !hasPrefix(w, "COMMIT", "PREPARED"), hasPrefix(w, "END"):
		return "commit"
	case hasPrefix(w, "ROLLBACK") && !hasPrefix(w, "ROLLBACK", "PREPARED"), hasPrefix(w, "ABORT"):
		return "rollback"
	case hasPrefix(w, "SAVEPOINT"), hasPrefix(w, "RELEASE"), hasPrefix(w, "PREPARE", "TRANSACTION"),
		hasPrefix(w, "COMMIT", "PREPARED"), hasPrefix(w, "ROLLBACK", "PREPARED"):
		return "other"
	}
	return ""
}

// scanQuoted reads the body of a literal quoted by q from i (just past the
// opening quote): a doubled q stands for itself and, with backslash (the
// E-prefixed strings), a backslash escapes the next byte. It returns the index just past
// the closing quote, and false when there is none.
func scanQuoted(src string, i int, q byte, backslash bool) (int, bool) {
	for n := len(src); i < n; i++ {
		switch {
		case backslash && src[i] == '\\':
			i++
		case src[i] == q:
			if i+1 < n && src[i+1] == q {
				i++
				continue
			}
			return i + 1, true
		}
	}
	return i, false
}
