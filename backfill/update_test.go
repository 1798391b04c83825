package backfill

import (
	"strings"
	"testing"
)

func TestUpdateIDIgnoresWhiteSpaceAndTuning(t *testing.T) {
	a := spec{Schema: "public", Table: "orders", Set: normalize("customer_email  =\n customers.email"), From: normalize(" customers"),
		Where: normalize("orders.customer_id = customers.id"), OnlyNull: "customer_email"}
	b := spec{Schema: "public", Table: "orders", Set: "customer_email = customers.email", From: "customers",
		Where: "orders.customer_id = customers.id", OnlyNull: "customer_email", UpperKey: []string{"9"}, Estimate: 3}
	if a.id() != b.id() || !strings.HasPrefix(a.id(), "bf_") {
		t.Fatalf("ids differ: %s %s", a.id(), b.id())
	}
	c := b
	c.OnlyNull = ""
	if c.id() == b.id() {
		t.Fatal("--only-null must change the id")
	}
}

func TestUpdateStatementQuotesGeneratedNames(t *testing.T) {
	tb := table{key: []string{"Order Id", "line"}, keyTypes: []string{"integer", "text"}}
	tb.name.Schema, tb.name.Name = "Shop", "Order Items"
	st := build(tb, Update{Set: `"Total" = qty`, OnlyNull: "Total"}, true)
	for _, want := range []string{`"Shop"."Order Items"`, `("Order Id", "line") <= ($2::text::integer, $3::text::text)`,
		`("Order Id", "line") > ($4::text::integer, $5::text::text)`, `"Shop"."Order Items"."Total" IS NULL`} {
		if !strings.Contains(st.next, want) {
			t.Errorf("statement lacks %q:\n%s", want, st.next)
		}
	}
	if strings.Contains(st.first, "> (") {
		t.Errorf("first batch has a lower bound:\n%s", st.first)
	}
}
