package pgsql

import (
	"errors"
	"fmt"
	"strings"
)

// ErrBadName means a dotted name given by an operator could not be parsed.
var ErrBadName = errors.New("bad name")

// ParseName cuts an operator-written dotted name (orders, public.orders,
// "My Schema"."Orders".col) into its parts, honouring double quotes and
// folding unquoted ASCII letters to lower case as PostgreSQL does.
func ParseName(s string) ([]string, error) {
	var parts []string
	var cur strings.Builder
	quoted, seen := false, false
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case quoted && c == '"' && i+1 < len(s) && s[i+1] == '"':
			cur.WriteByte('"')
			i++
		case c == '"':
			quoted = !quoted
			seen = true
		case !quoted && c == '.':
			if cur.Len() == 0 {
				return nil, fmt.Errorf("%q: empty part: %w", s, ErrBadName)
			}
			parts = append(parts, cur.String())
			cur.Reset()
			seen = false
		default:
			if !quoted && c >= 'A' && c <= 'Z' {
				c += 'a' - 'A'
			}
			cur.WriteByte(c)
			seen = true
		}
	}
	if quoted || !seen || cur.Len() == 0 {
		return nil, fmt.Errorf("%q: %w", s, ErrBadName)
	}
	return append(parts, cur.String()), nil
}
