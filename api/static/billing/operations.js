// Written by `make trusted` from operations.graphql: do not edit. The page sends
// these ids instead of the documents (trusted documents: api/trusted.py).
export const OPERATIONS = {
  BillingAccount: "a78b288eacd0123eb45b25d253fac63e9da5ae076210fa7413368393c4d40ae6",
  Viewer: "b0b578d1a212d3e487cefee3ba114e6f94044d2880fec6732531ee98e0cf5151",
  SetPrimaryCard: "187bfd898f7746d412fd51a78573035482e6575883d289b6659b6fa067949dcf",
  RemoveCard: "3bd54269a05c61151949b19082d4bb1035c114cd1691bb6dc6633efd1f1c25c0",
  UpdateCard: "aa75e54dc8e8a7fb00e4a121ab3866f90bb57bbd84604faa7d4594a5fc0a93f7",
  StartCardSetup: "941028177bcce1d9c9fa98109ebf8b9b0f2de95a67512d9d34f912472b17518b",
  AddCard: "92e6e9c4b1d403b33da6939e2bddb6a639f4d300409dd10fdb63498eb15dd485",
  PurchaseCredits: "4f65ef8b8a77b0ff3db1768e90ba689581b653227997fb4be612c311256f9f69",
  ConfirmPurchase: "e0678e851bc802750e6dd327231fc78a255c23b4c68e3cf100f160049f601d7c",
  UpdateAutoRecharge: "f56003ba1a566c54a8ea3123d4549ce56282ddcc670fe7bc21646fa187e12487",
  UpdateLowBalanceAlert: "84ff59807b2036f51f34fdc11a8eee9d5580363bbd3e09d27794b8bed37c68de",
  Transactions: "489aa1e5b12c763c5aa3e1588529bfbd4bf3ae64064861329ead142898c6fdc0",
  Usage: "614d30f94abd667ad0bfd5c48094fc443d63960d8b7beb3d026204624d9c140b",
};
