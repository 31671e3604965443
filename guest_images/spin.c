/* spin: never finish, for the VMM's --timeout handling. */
#include "runtime.h"

int main(struct hvm_start_info *si)
{
    (void)si;
    puts("spinning");
    for (;;)
        __asm__ volatile("pause");
}
