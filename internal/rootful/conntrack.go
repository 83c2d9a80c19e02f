package rootful

import (
	"fmt"

	"github.com/vishvananda/netlink/nl"
	"golang.org/x/sys/unix"
)

// ctaMarkMask is CTA_MARK_MASK, which the nl package does not name.
const ctaMarkMask = 21

// forgetConnections deletes every conntrack entry carrying the slot's
// mark. The table lets a packet whose connection has that mark pass as
// established, without the policy: a connection a previous sandbox of
// the slot left behind would pass for a new sandbox that reuses the slot
// and the addresses, whatever its policy says (a UDP flow from the same
// port got its echo through a --deny-cidr for the echo server). So they
// go before the table is installed, and again when the sandbox is gone.
func forgetConnections(slot int) error {
	req := ctnetlink(nl.IPCTNL_MSG_CT_DELETE)
	req.AddData(nl.NewRtAttr(nl.CTA_MARK, nl.BEUint32Attr(slotMark(slot))))
	req.AddData(nl.NewRtAttr(ctaMarkMask, nl.BEUint32Attr(slotMask)))
	if _, err := req.Execute(unix.NETLINK_NETFILTER, 0); err != nil {
		return fmt.Errorf("deleting the conntrack entries of slot %d (mark %#x): %w", slot, slotMark(slot), err)
	}
	return nil
}

// ipctnlMsgCtGetStats is IPCTNL_MSG_CT_GET_STATS, which the nl package
// does not name.
const ipctnlMsgCtGetStats = 5

// ConntrackOverNetlink says whether conntrack answers over netlink
// (nf_conntrack_netlink), as --root needs it to (forgetConnections):
// asking for its statistics changes nothing.
func ConntrackOverNetlink() error {
	_, err := ctnetlink(ipctnlMsgCtGetStats).Execute(unix.NETLINK_NETFILTER, 0)
	return err
}

// ctnetlink is a request of conntrack's netlink subsystem for both
// families (AF_UNSPEC with version 0), in one pass.
func ctnetlink(msg int) *nl.NetlinkRequest {
	req := nl.NewNetlinkRequest(unix.NFNL_SUBSYS_CTNETLINK<<8|msg, unix.NLM_F_ACK)
	req.AddData(&nl.Nfgenmsg{NfgenFamily: unix.AF_UNSPEC, Version: nl.NFNETLINK_V0})
	return req
}
