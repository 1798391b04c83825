package shadow

import (
	"errors"
	"fmt"
	"strings"
	"unicode"
)

// ErrBadAlter means the --alter text could not be understood.
var ErrBadAlter = errors.New("bad --alter")

// alterCommand is one top-level sub-command of the operator's ALTER TABLE.
type alterCommand struct {
	Text string
	// TypeChange is set for ALTER [COLUMN] c [SET DATA] TYPE t [USING e].
	TypeChange *typeChange
}

type typeChange struct {
	Column string
	Using  string // "" when no USING
}

// parseAlter splits the operator's ALTER TABLE sub-commands at top-level
// commas (outside quotes, dollar quotes, comments and parentheses) and
// recognises column type changes with their USING expressions, which the copy
// needs: PostgreSQL keeps no record of them.
func parseAlter(s string) ([]alterCommand, error) {
	s = strings.TrimSpace(s)
	s = strings.TrimSuffix(s, ";")
	if up := strings.ToUpper(s); strings.HasPrefix(up, "ALTER TABLE") {
		return nil, fmt.Errorf("%w: give only the sub-commands that follow `ALTER TABLE <table>` (e.g. \"ALTER COLUMN amount TYPE numeric(12,2)\"), not the whole statement", ErrBadAlter)
	}
	if s == "" {
		return nil, fmt.Errorf("%w: it is empty", ErrBadAlter)
	}
	parts, err := splitTopLevel(s)
	if err != nil {
		return nil, err
	}
	var out []alterCommand
	for _, p := range parts {
		p = strings.TrimSpace(p)
		if p == "" {
			return nil, fmt.Errorf("%w: an empty sub-command (two commas in a row?)", ErrBadAlter)
		}
		cmd := alterCommand{Text: p}
		toks := tokens(p)
		cmd.TypeChange = matchTypeChange(toks, p)
		out = append(out, cmd)
	}
	return out, nil
}

// splitTopLevel splits at commas outside quotes, comments and parentheses.
func splitTopLevel(s string) ([]string, error) {
	var parts []string
	depth, start := 0, 0
	for i := 0; i < len(s); i++ {
		switch c := s[i]; {
		case c == '\'' || c == '"':
			j := strings.IndexByte(s[i+1:], c)
			for j >= 0 && i+1+j+1 < len(s) && s[i+1+j+1] == c { // doubled quote
				k := strings.IndexByte(s[i+1+j+2:], c)
				if k < 0 {
					j = -1
					break
				}
				j += 2 + k
			}
			if j < 0 {
				return nil, fmt.Errorf("%w: unterminated %c quote", ErrBadAlter, c)
			}
			i += 1 + j
		case c == '$':
			tag := dollarTag(s[i:])
			if tag == "" {
				continue
			}
			j := strings.Index(s[i+len(tag):], tag)
			if j < 0 {
				return nil, fmt.Errorf("%w: unterminated dollar quote %s", ErrBadAlter, tag)
			}
			i += len(tag) + j + len(tag) - 1
		case c == '-' && i+1 < len(s) && s[i+1] == '-':
			j := strings.IndexByte(s[i:], '\n')
			if j < 0 {
				i = len(s)
			} else {
				i += j
			}
		case c == '/' && i+1 < len(s) && s[i+1] == '*':
			j := strings.Index(s[i+2:], "*/")
			if j < 0 {
				return nil, fmt.Errorf("%w: unterminated comment", ErrBadAlter)
			}
			i += 2 + j + 1
		case c == '(':
			depth++
		case c == ')':
			depth--
			if depth < 0 {
				return nil, fmt.Errorf("%w: unbalanced parentheses", ErrBadAlter)
			}
		case c == ',' && depth == 0:
			parts = append(parts, s[start:i])
			start = i + 1
		}
	}
	if depth != 0 {
		return nil, fmt.Errorf("%w: unbalanced parentheses", ErrBadAlter)
	}
	return append(parts, s[start:]), nil
}

func dollarTag(s string) string {
	if len(s) < 2 || s[0] != '$' {
		return ""
	}
	for i := 1; i < len(s); i++ {
		if s[i] == '$' {
			return s[:i+1]
		}
		if !(unicode.IsLetter(rune(s[i])) || s[i] == '_' || (i > 1 && unicode.IsDigit(rune(s[i])))) {
			return ""
		}
	}
	return ""
}

// token is a word of a sub-command: an identifier (case-folded unless
// quoted), with its byte offset.
type token struct {
	Word   string
	Quoted bool
	Pos    int
	End    int
}

// tokens splits s into words, quoted identifiers and single punctuation.
func tokens(s string) []token {
	var out []token
	for i := 0; i < len(s); {
		c := s[i]
		switch {
		case unicode.IsSpace(rune(c)):
			i++
		case c == '"':
			j := i + 1
			var b strings.Builder
			for j < len(s) {
				if s[j] == '"' {
					if j+1 < len(s) && s[j+1] == '"' {
						b.WriteByte('"')
						j += 2
						continue
					}
					break
				}
				b.WriteByte(s[j])
				j++
			}
			out = append(out, token{Word: b.String(), Quoted: true, Pos: i, End: min(j+1, len(s))})
			i = j + 1
		case c == '_' || unicode.IsLetter(rune(c)) || c >= 0x80:
			j := i
			for j < len(s) && (s[j] == '_' || s[j] == '$' || unicode.IsLetter(rune(s[j])) || unicode.IsDigit(rune(s[j])) || s[j] >= 0x80) {
				j++
			}
			out = append(out, token{Word: strings.ToLower(s[i:j]), Pos: i, End: j})
			i = j
		default:
			out = append(out, token{Word: string(c), Pos: i, End: i + 1})
			i++
		}
	}
	return out
}

func (t token) is(word string) bool { return !t.Quoted && t.Word == word }

// matchTypeChange recognises ALTER [COLUMN] c [SET DATA] TYPE t [COLLATE x] [USING e].
func matchTypeChange(toks []token, text string) *typeChange {
	if len(toks) < 3 || !toks[0].is("alter") {
		return nil
	}
	i := 1
	if toks[i].is("column") {
		i++
	}
	if i >= len(toks) {
		return nil
	}
	col := toks[i]
	i++
	if i < len(toks) && toks[i].is("set") {
		i++
		if i < len(toks) && toks[i].is("data") {
			i++
		}
	}
	if i >= len(toks) || !toks[i].is("type") {
		return nil
	}
	tc := &typeChange{Column: col.Word}
	// USING at parenthesis depth 0 after the type.
	depth := 0
	for j := i + 1; j < len(toks); j++ {
		switch {
		case toks[j].Word == "(" && !toks[j].Quoted:
			depth++
		case toks[j].Word == ")" && !toks[j].Quoted:
			depth--
		case depth == 0 && toks[j].is("using"):
			tc.Using = strings.TrimSpace(text[toks[j].End:])
			return tc
		}
	}
	return tc
}
