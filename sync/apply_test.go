package sync

import (
	"fmt"
	"strings"
	"testing"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5/pgtype"
	"github.com/shadowctl/shadowctl/internal/pgmeta"
	"github.com/shadowctl/shadowctl/internal/pgsql"
	"github.com/shadowctl/shadowctl/internal/rowmap"
)

// The grouping decisions only: which statements a sequence of changes
// becomes, with which rows. What the statements do to green is tested
// against PostgreSQL (integration.TestLogicalApplyBurst).
func TestBatcherGroups(t *testing.T) {
	// docs (id int, body text): u marks an unchanged TOASTed body.
	tuple := func(id, body string) *pglogrepl.TupleData {
		col := func(v string) *pglogrepl.TupleDataColumn {
			switch v {
			case "u":
				return &pglogrepl.TupleDataColumn{DataType: pglogrepl.TupleDataTypeToast}
			case "null":
				return &pglogrepl.TupleDataColumn{DataType: pglogrepl.TupleDataTypeNull}
			}
			return &pglogrepl.TupleDataColumn{DataType: pglogrepl.TupleDataTypeText, Data: []byte(v)}
		}
		return &pglogrepl.TupleData{Columns: []*pglogrepl.TupleDataColumn{col(id), col(body)}}
	}
	ins := func(id, body string) pglogrepl.Message { return &pglogrepl.InsertMessage{Tuple: tuple(id, body)} }
	upd := func(id, body string) pglogrepl.Message { return &pglogrepl.UpdateMessage{NewTuple: tuple(id, body)} }
	rekey := func(old, id, body string) pglogrepl.Message {
		return &pglogrepl.UpdateMessage{OldTuple: tuple(old, "null"), NewTuple: tuple(id, body)}
	}
	del := func(id string) pglogrepl.Message { return &pglogrepl.DeleteMessage{OldTuple: tuple(id, "null")} }

	for _, tc := range []struct {
		name              string
		groupable, merged bool
		changes           []pglogrepl.Message
		want              string
	}{
		{"distinct keys: one upsert", true, false,
			[]pglogrepl.Message{ins("1", "a"), upd("2", "b"), ins("3", "c")},
			"upsert 1=a 2=b 3=c"},
		{"deletes go first", true, false,
			[]pglogrepl.Message{upd("1", "a"), del("2"), ins("3", "c"), del("4")},
			"delete 2 4 | upsert 1=a 3=c"},
		{"delete then re-insert stays in the group", true, false,
			[]pglogrepl.Message{del("1"), ins("1", "new"), upd("2", "b")},
			"delete 1 | upsert 1=new 2=b"},
		{"upsert then delete keeps the delete only", true, false,
			[]pglogrepl.Message{ins("1", "a"), upd("2", "b"), del("1"), upd("3", "c")},
			"delete 1 | upsert 2=b 3=c"},
		{"upsert, delete, re-insert", true, false,
			[]pglogrepl.Message{upd("1", "a"), del("1"), ins("1", "b")},
			"delete 1 | upsert 1=b"},
		{"a repeated upsert ends the group", true, false,
			[]pglogrepl.Message{upd("1", "a"), upd("2", "b"), upd("1", "c")},
			"upsert 1=a 2=b | upsert 1=c"},
		{"a repeated upsert merges without other unique indexes", true, true,
			[]pglogrepl.Message{upd("1", "a"), upd("2", "b"), upd("1", "u"), upd("1", "c"), upd("2", "u")},
			"upsert 1=c 2=b"},
		{"merging keeps an unchanged value unchanged", true, true,
			[]pglogrepl.Message{upd("1", "u"), upd("1", "u")},
			"upsert 1=(unchanged)"},
		{"a second delete ends the group", true, false,
			[]pglogrepl.Message{del("1"), del("1")},
			"delete 1 | delete 1"},
		{"a key change is a delete and an upsert", true, false,
			[]pglogrepl.Message{upd("3", "c"), rekey("1", "2", "b"), upd("4", "d")},
			"delete 1 | upsert 3=c 2=b 4=d"},
		{"a key change with an unchanged value is a move of its own", true, false,
			[]pglogrepl.Message{upd("3", "c"), rekey("1", "2", "u"), upd("4", "d")},
			"upsert 3=c | move 1->2=(unchanged) | upsert 4=d"},
		{"not groupable: a statement per change", false, false,
			[]pglogrepl.Message{upd("1", "a"), del("2"), ins("3", "c")},
			"upsert 1=a | delete 2 | upsert 3=c"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a := &Applier{
				Mapping: rowmap.Mapping{
					Source: pgsql.QualifiedName{Schema: "public", Name: "docs"}, Target: pgsql.QualifiedName{Schema: "green", Name: "docs"},
					Alias: "docs", SourceKey: []string{"id"}, SourceKeyTypes: []string{"integer"}, ConflictKey: []string{"id"},
					Columns: []rowmap.Column{{Target: "id", TargetType: "integer", Expr: `"docs"."id"`, Source: "id"}, {Target: "body", TargetType: "text", Expr: `"docs"."body"`, Source: "body"}},
				},
				SourceColumns: []pgmeta.Column{{Name: "id", Type: "integer", TypeOID: 23}, {Name: "body", Type: "text", TypeOID: 25}},
				keyCols:       []int{0}, groupable: tc.groupable, mergeUpserts: tc.merged, sameKeySameRow: true,
			}
			b := &batcher{a: a}
			for _, m := range tc.changes {
				if err := b.add(m); err != nil {
					t.Fatal(err)
				}
			}
			if got := describe(b.take()); got != tc.want {
				t.Errorf("got  %s\nwant %s", got, tc.want)
			}
		})
	}
}

// describe renders statements as "kind rows", joined by " | ".
func describe(stmts []queued) string {
	var out strings.Builder
	for i, s := range stmts {
		if i > 0 {
			out.WriteString(" | ")
		}
		col := func(c, row int) string {
			v := s.args[c].(pgtype.FlatArray[pgtype.Text])[row]
			if len(s.args) > 2 && c == 1 { // a flags array follows the values
				if u, ok := s.args[2].(pgtype.FlatArray[bool]); ok && u[row] {
					return "(unchanged)"
				}
			}
			if !v.Valid {
				return "(null)"
			}
			return v.String
		}
		ids := s.args[0].(pgtype.FlatArray[pgtype.Text])
		switch {
		case strings.HasPrefix(s.sql, "DELETE"):
			out.WriteString("delete")
			for r := range ids {
				out.WriteString(" " + col(0, r))
			}
		case strings.HasPrefix(s.sql, "WITH"):
			old := s.args[len(s.args)-1].(pgtype.FlatArray[pgtype.Text])
			fmt.Fprintf(&out, "move %s->%s=%s", old[0].String, col(0, 0), col(1, 0))
		default:
			out.WriteString("upsert")
			for r := range ids {
				fmt.Fprintf(&out, " %s=%s", col(0, r), col(1, r))
			}
		}
	}
	return out.String()
}
