package backfill

import (
	"strings"
	"testing"

	"github.com/shadowctl/shadowctl/internal/pgsql"
	"github.com/shadowctl/shadowctl/internal/rowmap"
)

// The batch's upper bound must read batch_keys' own key column: written as the
// outer alias's column it would compare each row with itself, and a batch
// would copy the rest of its range (the bug that made logical copies fail
// with serialization errors).
func TestBatchSQLBoundsSourceRowsByIDs(t *testing.T) {
	c := &Copier{Mapping: rowmap.Mapping{
		Source: pgsql.QualifiedName{Schema: "public", Name: "orders"}, Target: pgsql.QualifiedName{Schema: "green", Name: "orders"},
		Alias: "orders", SourceKey: []string{"id"}, SourceKeyTypes: []string{"integer"}, ConflictKey: []string{"id"},
		Columns: []rowmap.Column{{Target: "id", TargetType: "bigint", Expr: `"orders"."id"`}},
	}}
	for _, form := range []batchForm{plainInsert, onConflictNothing} {
		sql := c.batchSQL(Range{}, true, form)
		if strings.Contains(sql, "IS NULL OR") {
			t.Fatalf("the lower bound is an OR: with a generic plan it is no index condition:\n%s", sql)
		}
		if !strings.Contains(sql, `("orders"."id") <= (SELECT "batch_keys"."id" FROM batch_keys ORDER BY batch_keys."id" DESC LIMIT 1)`) {
			t.Fatalf("the batch does not bound its rows by the last id it read:\n%s", sql)
		}
		if got := strings.Contains(sql, "ON CONFLICT"); got != (form == onConflictNothing) {
			t.Fatalf("form %d: ON CONFLICT present = %v:\n%s", form, got, sql)
		}
	}
}
