package integration

import (
	"testing"

	"github.com/shadowctl/shadowctl/shadow"
)

// Trigger sync reads from NEW only the columns its mapping reads. A column
// the change drops from green is not among them, so when someone drops it
// from blue too before the cutover, the application's writes to blue go on
// and green stays current (a trigger naming the column would fail every
// write with "record new has no field").
func TestSyncReadsOnlyTheColumnsItMaps(t *testing.T) {
	db := newTestDB(t)
	db.createOrders(2000)
	db.exec(`ALTER TABLE orders ADD COLUMN legacy text DEFAULT 'old'`)
	db.ready(shadow.Request{Table: "orders", Alter: "DROP COLUMN legacy, " + issue4Alter, BatchSize: 1000,
		ReverseMap: map[string]string{"legacy": "NULL"}})
	db.exec(`ALTER TABLE public.orders DROP COLUMN legacy`,
		`INSERT INTO public.orders (customer_id, customer_name, amount) VALUES (7, 'customer 7', 12.5)`,
		`UPDATE public.orders SET status = 'paid', amount = amount + 1 WHERE id % 10 = 0`,
		`UPDATE public.orders SET id = id + 100000 WHERE id = 5`,
		`DELETE FROM public.orders WHERE id % 10 = 1`)
	db.assertGreenMatches(`SELECT id, customer_id, customer_name, amount::numeric(12,2), status FROM public.orders`,
		`SELECT id, customer_id, customer_name, amount, status FROM green.orders`)
}
