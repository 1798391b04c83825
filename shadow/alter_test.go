package shadow

import (
	"errors"
	"testing"
)

func TestParseAlterFindsTypeChangesAndUsing(t *testing.T) {
	cmds, err := parseAlter(`ALTER COLUMN amount TYPE numeric(12,2) USING round(amount::numeric, 2), ADD COLUMN "Note, with comma" text DEFAULT 'a,b', alter "Weird ""Col""" set data type bigint, DROP COLUMN customer_name`)
	if err != nil {
		t.Fatal(err)
	}
	if len(cmds) != 4 {
		t.Fatalf("got %d sub-commands, want 4: %+v", len(cmds), cmds)
	}
	if tc := cmds[0].TypeChange; tc == nil || tc.Column != "amount" || tc.Using != "round(amount::numeric, 2)" {
		t.Fatalf("first: %+v", cmds[0].TypeChange)
	}
	if cmds[1].TypeChange != nil {
		t.Fatalf("ADD COLUMN taken for a type change")
	}
	if tc := cmds[2].TypeChange; tc == nil || tc.Column != `Weird "Col"` || tc.Using != "" {
		t.Fatalf("third: %+v", cmds[2].TypeChange)
	}
}

func TestParseAlterRejects(t *testing.T) {
	for _, s := range []string{"", "ALTER TABLE orders ADD COLUMN x int", "ADD COLUMN x int,, DROP COLUMN y", "ADD COLUMN x int DEFAULT 'oops", "ADD CHECK ((x > 0)"} {
		if _, err := parseAlter(s); !errors.Is(err, ErrBadAlter) {
			t.Errorf("parseAlter(%q) = %v, want ErrBadAlter", s, err)
		}
	}
}
